"""How a user sets a data option, for error messages: the flag they type, then the config key.

A hint that names only the config key (``features=``) leaves a command-line user guessing
which flag that is, and one that names only the flag leaves a config-file user guessing the
key; :func:`setting` names both, e.g. ``--features a,b (features = [...] in a config)``.
"""

from __future__ import annotations

# key -> (flag of `medfed run`, placeholder value, how the config file spells it)
_SETTINGS: dict[str, tuple[str, str, str]] = {
    "site_column": ("--site-column", "NAME", 'site_column = "NAME"'),
    "label_column": ("--label-column", "NAME", 'label_column = "NAME"'),
    "label_columns": ("--label-columns", "a,b,c", "label_columns = [...]"),
    "label_column_site": ("--label-column-site", "SITE=COL", 'label_column_site = {SITE = "COL"}'),
    "split_column": ("--split-column", "NAME", 'split_column = "NAME"'),
    "features": ("--features", "a,b", "features = [...]"),
    "impute": ("--impute", "mean|median", 'impute = "mean"'),
    "positive_label": ("--positive-label", "VALUE", 'positive_label = "VALUE"'),
    "exclude": ("--exclude", "a,b", "exclude = [...]"),
    "categorical": ("--categorical", "a,b", "categorical = [...]"),
    "covariates": ("--covariates", "a,b", "covariates = [...]"),
    "task": ("--task", "binary|multiclass|regression|multilabel", 'task = "multiclass"'),
    "kind": ("--kind", "auto|nifti|dicom|image", 'kind = "auto"'),
    "skip_bad": ("--skip-bad", "", "skip_bad = true"),
    "unlabeled_value": ("--unlabeled-value", "VALUE", 'unlabeled_value = "VALUE"'),
    "labeled_fraction": ("--labeled-fraction", "F", "labeled_fraction = F"),
    "labeled_fraction_site": ("--labeled-fraction-site", "SITE=F", "labeled_fraction_site = {SITE = F}"),
}


def flag(key: str) -> str:
    """The flag alone (``--features``), for a message that names the option without a value."""
    return _SETTINGS[key][0]


def setting(key: str, value: str | None = None) -> str:
    """``--features a,b (features = [...] in a config)``; ``value`` replaces the placeholder."""
    name, placeholder, config = _SETTINGS[key]
    shown = placeholder if value is None else value
    return f"{name}{' ' + shown if shown else ''} ({config} in a config)"
