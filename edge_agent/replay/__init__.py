"""Record and replay a store's raw inputs (``edge-agent record`` / ``edge-agent replay``).

``recording.py`` is the file format (JSON lines, one pydantic model per kind) and its writer and reader;
``taps.py`` attaches a recorder to a running agent's input edges; ``player.py`` feeds a recording through
the same pipeline objects on a virtual clock and writes what they produced.
"""
