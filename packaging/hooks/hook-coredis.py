"""coredis is compiled with mypyc: its extension modules import a shared top-level helper module
(`<hash>__mypyc`) from C, where PyInstaller's scan cannot see it. Without it, `auth.store = "redis"`
fails at the first import of coredis. The helper's name changes with each coredis build, so it is
read from the installed distribution's file list."""

from importlib.metadata import files

hiddenimports = sorted(
    {f.name.split(".", 1)[0] for f in files("coredis") or () if "/" not in str(f) and "__mypyc" in f.name}
)
