"""The ``varsweep`` console command: one name for the project's two entry points, ``python -m bench`` (sweeps on
Ray; the training side, ``pip install 'varsweep[train]'``) and ``python -m analysis`` (tables, figures and the report
page; the light install). See ``varsweep.__main__``. Importing this package imports nothing else."""
