"""The profiler: real fine-tuning steps on a CUDA card, measured (needs the `[profile]` extra).

Nothing here is imported by `import vramplan`; torch and friends load only inside the worker.
"""
