"""Studies built on the WaDi library, importing ``wadi_core`` (and ``pipelines``) like any user would."""
