"""What the notebooks use: :mod:`.parameters` (the parameter checker), :mod:`.runs` (which runs and data
sets a notebook shows), :mod:`.examples`, :mod:`.starting_model` (notebook 01), :mod:`.notebook` (setup,
figure export, output stripping) and, for live JupyterLab, :mod:`.widgets` and :mod:`.live`."""
