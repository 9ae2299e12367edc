"""User-facing errors. The CLI prints ``UserError`` as one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


class DataNotFound(UserError):
    """A dataset named by a checkpoint or a flag is not on this machine."""


def _numeric(annotation) -> bool:
    """int or float, alone or with None."""
    import typing
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation in (int, float) or bool(args) and all(a in (int, float) for a in args)


def validated_config(config_cls, kind: str, name: str, kwargs: dict):
    """Build a pydantic config, turning a validation error into one clear line."""
    from pydantic import ValidationError
    for key, value in kwargs.items():
        # pydantic takes True as 1 for a number; in Python that is always a slip (epochs=True)
        field = config_cls.model_fields.get(key)
        if isinstance(value, bool) and field is not None and _numeric(field.annotation):
            raise UserError(f"{kind} {name}: option {key}: give a number, not {value}")
    try:
        return config_cls(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            import difflib
            bad = str(err["loc"][0])
            known = list(config_cls.model_fields)
            close = difflib.get_close_matches(bad, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"{kind} {name}: unknown option {bad!r}; {hint}options: {', '.join(known)}") from None
        raise UserError(f"{kind} {name}: option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
