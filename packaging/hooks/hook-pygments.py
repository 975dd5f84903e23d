"""Replaces PyInstaller's own pygments hook, which bundles every lexer, formatter and style (about
1.5 MB compressed). Here pygments is only reached through rich (imported by bittensor), which
highlights Python tracebacks at most: the Python lexers and the styles are enough; any other lexer
name is pygments' ordinary ClassNotFound, which rich handles."""

from PyInstaller.utils.hooks import collect_submodules

hiddenimports = ["pygments.lexers.python", *collect_submodules("pygments.styles")]
