"""The plugin interface (NTKPlugin, the errors) and the call machinery every plugin runs through: validation, the engine, tiling, state, costs."""
