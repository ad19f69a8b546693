"""Bytecode keyed by source content, for renv's envs (written into each env by renv).

Python finds a module's bytecode by the source's path (with PYTHONPYCACHEPREFIX, a tree
mirroring source paths). Every renv env has paths of its own, so without this a new env
compiles every module it imports again, although most of its files are the very files
another env already had (the same wheel, hardlinked from the installer's cache).

Here modules loaded from inside the store are looked up by what their source holds
instead: `<PYTHONPYCACHEPREFIX>/.renv-by-content/<blake2b of the source>.<tag>.pyc`, a
PEP 552 hash-based .pyc. The same bytes compile once per node and user, for every env.

- The cache is the user's own (renv points PYTHONPYCACHEPREFIX at a directory of the
  worker's uid): no user ever loads bytecode another user wrote.
- A hit is checked against the source it was found by (the name is the source's digest;
  the header is checked), and the code object is given the importing file's path, so
  tracebacks and `__file__`-relative code see this env's own files.
- Modules outside the store (the standard library, the user's own paths) are loaded as
  Python always does. So is everything when PYTHONPYCACHEPREFIX is not set (the env's
  python run by hand), or if anything here is missing in this Python: this only ever
  makes imports faster, never different.
"""


def _install():
    import _imp
    import marshal
    import os
    import sys
    from importlib import _bootstrap_external as external
    from importlib import machinery

    from _blake2 import blake2b

    prefix = sys.pycache_prefix
    # The env is <store>/envs/<key>; modules anywhere in <store> are the store's.
    envs = os.path.dirname(sys.prefix)
    if not prefix or os.path.basename(envs) != "envs":
        return
    store = os.path.dirname(envs) + os.sep
    cache = os.path.join(prefix, ".renv-by-content")
    optimize = f".opt-{sys.flags.optimize}" if sys.flags.optimize else ""
    suffix = f".{sys.implementation.cache_tag}{optimize}.pyc"
    magic = external.MAGIC_NUMBER
    # The key Python hashes sources with for hash-based .pyc files: the magic number as an
    # integer (3.13 and before name it `_RAW_MAGIC_NUMBER`, 3.14 `_imp.pyc_magic_number_token`).
    hash_key = int.from_bytes(magic, "little")
    # PEP 552: hash-based, checked against the source.
    flags = (0b11).to_bytes(4, "little")
    # Everything used per import is looked up now: one missing in this Python leaves
    # imports as they are instead of failing each one.
    source_hash = _imp.source_hash
    fix_co_filename = _imp._fix_co_filename
    write_atomic = external._write_atomic
    code_type = type(_install.__code__)

    class ContentKeyedLoader(machinery.SourceFileLoader):
        def get_code(self, fullname):
            path = self.get_filename(fullname)
            source = self.get_data(path)
            key = blake2b(source, digest_size=16).hexdigest()
            pyc = os.path.join(cache, key[:2], key[2:] + suffix)
            header = magic + flags + source_hash(hash_key, source)
            try:
                with open(pyc, "rb") as f:
                    data = f.read()
            except OSError:
                data = b""
            if data[:16] == header:
                try:
                    code = marshal.loads(memoryview(data)[16:])
                except (EOFError, ValueError, TypeError):
                    code = None
                if isinstance(code, code_type):
                    fix_co_filename(code, path)
                    return code
            code = self.source_to_code(source, path)
            if not sys.dont_write_bytecode:
                try:
                    os.makedirs(os.path.dirname(pyc), mode=0o700, exist_ok=True)
                    write_atomic(pyc, header + marshal.dumps(code), 0o600)
                except OSError:
                    pass
            return code

    loaders = [
        (ContentKeyedLoader if loader is machinery.SourceFileLoader else loader, suffixes)
        for loader, suffixes in external._get_supported_file_loaders()
    ]
    in_store = machinery.FileFinder.path_hook(*loaders)

    def renv_store_path_hook(entry):
        if not os.path.join(os.path.abspath(entry), "").startswith(store):
            raise ImportError("not in the renv store")
        return in_store(entry)

    # Before the standard finder's hook (path hooks are asked in order); finders already
    # made for store paths are made again.
    standard = machinery.FileFinder.path_hook
    at = next(
        (i for i, hook in enumerate(sys.path_hooks) if getattr(hook, "__qualname__", "").startswith(standard.__qualname__)),
        len(sys.path_hooks),
    )
    sys.path_hooks.insert(at, renv_store_path_hook)
    sys.path_importer_cache.clear()


try:
    _install()
except Exception:  # noqa: BLE001 - an older or newer Python without these internals
    pass
