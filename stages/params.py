"""Read params.yaml: the one place that holds every knob of the pipeline."""

from __future__ import annotations

from pathlib import Path

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """A params file that is not valid YAML: one line naming the file, line and column."""


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            params = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{Path(path).as_posix()}:{mark.line + 1}:{mark.column + 1}" if mark else Path(path).as_posix()
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        # the Windows trap: "C:\Users\..." in double quotes reads \U as an escape
        hint = (" (a Windows path: write it with / or in single quotes; in double quotes \\ starts an escape)"
                if "escape" in problem else "")
        raise ParamsError(f"{where}: not valid YAML: {problem}{hint}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of stage names to settings")
    return params
