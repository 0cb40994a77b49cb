"""Decisions on top of estimates: fit verdicts per GPU (decide.fit) and the setup search (decide.plan).

The package is not named fit/plan so that the functions vramplan.fit and vramplan.plan do not
shadow (or get shadowed by) their modules."""
