"""utils: what every stage shares and none owns.

  errors.py     user-facing errors (`UserError`: one line, exit code 2), "did you mean", an error's first line
  fsutil.py     atomic writes, publishing built directories, writable-directory checks
  quiet.py      stops bitsandbytes' Hub kernel fetch at import; drops or rewords third-party lines about it
  schedules.py  learning-rate multipliers (warm-up, cosine, linear), pure functions
  machine.py    the CPU's name, for reports

May import: nothing of the package (the ground floor).
"""
