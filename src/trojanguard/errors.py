"""User-facing errors. The CLI prints ``UserError`` as one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


class DataNotFound(UserError):
    """A dataset named by a checkpoint or a flag is not on this machine."""


def validated_config(config_cls, kind: str, name: str, kwargs: dict):
    """Build a pydantic config, turning a validation error into one clear line."""
    from pydantic import ValidationError
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
