"""Pickles that would run code when loaded, for the tests that check they are refused: a
plain ``open`` and the two published bypasses of blocklist scanners (no os, subprocess or
builtins.eval in them). Each writes the file at its class attribute ``path``."""
import importlib
import inspect
import operator


class ImportIo:
    def __reduce__(self):
        return importlib.import_module, ("io",)


class MethodcallerPayload:
    """The blocklist bypass: operator.methodcaller('open', path, 'w') applied to
    importlib.import_module('io') - no os/subprocess/builtins.eval anywhere."""
    path = ""

    def __reduce__(self):
        return operator.methodcaller("open", self.path, "w"), (ImportIo(),)


class GetattrStatic:
    def __call__(self, *a):  # pickle wants a callable; unpickling builds the real one below
        pass

    def __reduce__(self):
        return inspect.getattr_static, (ImportIo(), "open")


class GetattrStaticPayload:
    """The other bypass: inspect.getattr_static(importlib.import_module('io'), 'open')(path, 'w')."""
    path = ""

    def __reduce__(self):
        return GetattrStatic(), (self.path, "w")


class OpenPayload:
    path = ""

    def __reduce__(self):
        return open, (self.path, "w")
