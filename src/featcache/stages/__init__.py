"""One module per DVC stage, named exactly like the stage and its ``params.yaml`` section; the
scripts in ``stages/`` call them. ``_grids`` is the machinery the image-folder stages share."""
