"""The recipes' configs: which keys there are, how they are checked and built, and how a mistake
in one is reported. One module per concern:

    schema.py          the keys of both recipes, their types and defaults (SCHEMA, SECTIONS, EVAL_*)
    checks.py          one config section against its schema: unknown keys, types, defaults, bounds
    instantiate.py     `_component_` sections: their keys against the constructor, and building them
    validate.py        validate_config / validate_eval_config: the two recipes' rules
    loss_modules.py    importing the modules a config's `loss_modules` names (a user's own losses)
    resume.py          what `resume=true` refuses to change (RESUME_FIXED_KEYS)
    error_line.py      the one line a user error prints, with the config file's line of its key

Import from the module that holds a name (`from polopt.config.validate import validate_config`);
`polopt.recipe_config` re-exports the names the recipes import.
"""
