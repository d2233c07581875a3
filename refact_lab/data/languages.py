"""Language detection by file name, extension and shebang line, without reading more than the first line.

The table covers the languages people most often train code models on (GitHub's top languages and then
some), plus the markup, data and prose formats found next to code, so the Scan panel can show "what is in
these sources" and turn types on and off. Each language has a category: only `programming` languages are
candidates for the automatic "most common code type" default.

Ambiguous extensions are settled by popularity in code repositories (`.h` is C, `.m` Objective-C, `.pl`
Perl, `.v` Verilog); a user can still switch any detected type on.
"""

from __future__ import annotations

import os
import re

PROGRAMMING = "programming"
MARKUP = "markup"
DATA = "data"
PROSE = "prose"

# name: (category, extensions, exact file names, shebang interpreters)
_TABLE: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "Python": (PROGRAMMING, (".py", ".pyi", ".pyw", ".pyt"), ("SConstruct", "SConscript", "BUILD.bazel", "BUILD",
                                                              "WORKSPACE", "Snakefile"),
               ("python", "pypy", "python2", "python3", "pypy3")),
    "Cython": (PROGRAMMING, (".pyx", ".pxd", ".pxi"), (), ()),
    "JavaScript": (PROGRAMMING, (".js", ".mjs", ".cjs", ".jsx"), ("Jakefile",), ("node", "nodejs", "deno", "bun")),
    "TypeScript": (PROGRAMMING, (".ts", ".tsx", ".mts", ".cts"), (), ("ts-node", "tsx")),
    "Java": (PROGRAMMING, (".java",), (), ()),
    "Kotlin": (PROGRAMMING, (".kt", ".kts"), (), ()),
    "Scala": (PROGRAMMING, (".scala", ".sc", ".sbt"), (), ("scala",)),
    "Groovy": (PROGRAMMING, (".groovy", ".gradle", ".gvy"), ("Jenkinsfile",), ("groovy",)),
    "C": (PROGRAMMING, (".c", ".h"), (), ()),
    "C++": (PROGRAMMING, (".cc", ".cpp", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp", ".tpp", ".inl",
                          ".ino"), (), ()),
    "CUDA": (PROGRAMMING, (".cu", ".cuh"), (), ()),
    "C#": (PROGRAMMING, (".cs", ".csx"), (), ()),
    "F#": (PROGRAMMING, (".fs", ".fsi", ".fsx"), (), ()),
    "Visual Basic": (PROGRAMMING, (".vb", ".vbs", ".bas"), (), ()),
    "Go": (PROGRAMMING, (".go",), (), ()),
    "Rust": (PROGRAMMING, (".rs",), (), ()),
    "Swift": (PROGRAMMING, (".swift",), (), ()),
    "Objective-C": (PROGRAMMING, (".m", ".mm"), (), ()),
    "Ruby": (PROGRAMMING, (".rb", ".rake", ".gemspec", ".ru", ".erb"), ("Rakefile", "Gemfile", "Guardfile",
                                                                          "Podfile", "Vagrantfile", "Fastfile"),
             ("ruby", "jruby")),
    "PHP": (PROGRAMMING, (".php", ".phtml", ".php3", ".php4", ".php5", ".phps"), (), ("php",)),
    "Perl": (PROGRAMMING, (".pl", ".pm", ".pod"), (), ("perl", "perl5")),
    "Lua": (PROGRAMMING, (".lua",), (), ("lua", "luajit")),
    "R": (PROGRAMMING, (".r", ".rmd"), (), ("rscript",)),
    "Julia": (PROGRAMMING, (".jl",), (), ("julia",)),
    "Dart": (PROGRAMMING, (".dart",), (), ("dart",)),
    "Haskell": (PROGRAMMING, (".hs", ".lhs"), (), ("runhaskell", "runghc")),
    "OCaml": (PROGRAMMING, (".ml", ".mli"), (), ("ocaml",)),
    "Elixir": (PROGRAMMING, (".ex", ".exs"), (), ("elixir",)),
    "Erlang": (PROGRAMMING, (".erl", ".hrl"), ("rebar.config",), ("escript",)),
    "Clojure": (PROGRAMMING, (".clj", ".cljs", ".cljc", ".edn"), (), ()),
    "Lisp": (PROGRAMMING, (".lisp", ".lsp", ".el", ".scm", ".ss", ".rkt"), (), ("sbcl", "racket", "guile")),
    "Elm": (PROGRAMMING, (".elm",), (), ()),
    "Zig": (PROGRAMMING, (".zig",), (), ()),
    "Nim": (PROGRAMMING, (".nim", ".nims"), (), ()),
    "Crystal": (PROGRAMMING, (".cr",), (), ("crystal",)),
    "D": (PROGRAMMING, (".d",), (), ()),
    "Fortran": (PROGRAMMING, (".f", ".for", ".f90", ".f95", ".f03", ".f08"), (), ()),
    "Pascal": (PROGRAMMING, (".pas", ".pp", ".dpr"), (), ()),
    "Ada": (PROGRAMMING, (".adb", ".ads"), (), ()),
    "COBOL": (PROGRAMMING, (".cob", ".cbl", ".cpy"), (), ()),
    "Assembly": (PROGRAMMING, (".asm", ".s", ".nasm"), (), ()),
    "Verilog": (PROGRAMMING, (".v", ".sv", ".svh", ".vh"), (), ()),
    "VHDL": (PROGRAMMING, (".vhd", ".vhdl"), (), ()),
    "Solidity": (PROGRAMMING, (".sol",), (), ()),
    "SQL": (PROGRAMMING, (".sql", ".psql", ".plsql"), (), ()),
    "Shell": (PROGRAMMING, (".sh", ".bash", ".zsh", ".ksh", ".fish", ".bats"),
              (".bashrc", ".bash_profile", ".zshrc", ".profile", "PKGBUILD"),
              ("sh", "bash", "zsh", "ksh", "dash", "ash", "fish", "mksh")),
    "PowerShell": (PROGRAMMING, (".ps1", ".psm1", ".psd1"), (), ("pwsh", "powershell")),
    "Batchfile": (PROGRAMMING, (".bat", ".cmd"), (), ()),
    "Tcl": (PROGRAMMING, (".tcl", ".tk"), (), ("tclsh", "wish")),
    "AWK": (PROGRAMMING, (".awk",), (), ("awk", "gawk", "mawk", "nawk")),
    "Makefile": (PROGRAMMING, (".mk", ".mak"), ("Makefile", "makefile", "GNUmakefile", "Kbuild"), ("make",)),
    "CMake": (PROGRAMMING, (".cmake",), ("CMakeLists.txt",), ()),
    "Dockerfile": (PROGRAMMING, (".dockerfile",), ("Dockerfile", "Containerfile"), ()),
    "HCL": (PROGRAMMING, (".tf", ".tfvars", ".hcl"), (), ()),
    "Nix": (PROGRAMMING, (".nix",), (), ()),
    "GLSL": (PROGRAMMING, (".glsl", ".vert", ".frag", ".geom", ".comp"), (), ()),
    "HLSL": (PROGRAMMING, (".hlsl", ".fx"), (), ()),
    "Vue": (PROGRAMMING, (".vue",), (), ()),
    "Svelte": (PROGRAMMING, (".svelte",), (), ()),
    "Jupyter Notebook": (PROGRAMMING, (".ipynb",), (), ()),
    # markup
    "HTML": (MARKUP, (".html", ".htm", ".xhtml"), (), ()),
    "CSS": (MARKUP, (".css",), (), ()),
    "SCSS": (MARKUP, (".scss", ".sass"), (), ()),
    "Less": (MARKUP, (".less",), (), ()),
    "XML": (DATA, (".xml", ".xsd", ".xsl", ".xslt", ".plist", ".csproj", ".vcxproj", ".props", ".targets",
                   ".wsdl", ".svg"), ("pom.xml",), ()),
    "Markdown": (PROSE, (".md", ".markdown", ".mdx"), (), ()),
    "reStructuredText": (PROSE, (".rst",), (), ()),
    "TeX": (MARKUP, (".tex", ".sty", ".cls", ".bib"), (), ()),
    "Text": (PROSE, (".txt",), ("README", "LICENSE", "COPYING", "AUTHORS", "CHANGELOG", "NOTICE", "CONTRIBUTORS"),
             ()),
    "Templates": (MARKUP, (".j2", ".jinja", ".jinja2", ".mustache", ".hbs", ".handlebars", ".ejs", ".twig",
                           ".liquid"), (), ()),
    # data
    "JSON": (DATA, (".json", ".jsonc", ".json5", ".geojson", ".jsonl"), (".babelrc", ".eslintrc", ".prettierrc"), ()),
    "YAML": (DATA, (".yml", ".yaml"), (".clang-format", ".clang-tidy"), ()),
    "TOML": (DATA, (".toml",), ("Cargo.lock", "Pipfile"), ()),
    "INI": (DATA, (".ini", ".cfg", ".conf", ".properties", ".editorconfig"), (".gitconfig", ".editorconfig",
                                                                            ".flake8", ".pylintrc"), ()),
    "CSV": (DATA, (".csv", ".tsv"), (), ()),
    "Protocol Buffer": (DATA, (".proto",), (), ()),
    "Thrift": (DATA, (".thrift",), (), ()),
    "GraphQL": (DATA, (".graphql", ".gql"), (), ()),
    "ANTLR": (PROGRAMMING, (".g4",), (), ()),
    "Ignore List": (DATA, (), (".gitignore", ".dockerignore", ".npmignore", ".gitattributes", ".hgignore"), ()),
}

CATEGORY: dict[str, str] = {name: row[0] for name, row in _TABLE.items()}
LANGUAGES: tuple[str, ...] = tuple(_TABLE)
_BY_EXT: dict[str, str] = {}
_BY_NAME: dict[str, str] = {}
_BY_INTERPRETER: dict[str, str] = {}
for _name, (_cat, _exts, _names, _interps) in _TABLE.items():
    for _e in _exts:
        _BY_EXT.setdefault(_e, _name)
    for _n in _names:
        _BY_NAME.setdefault(_n, _name)
    for _i in _interps:
        _BY_INTERPRETER.setdefault(_i, _name)

# Files that are binary by their extension: rejected as not_text without being read.
BINARY_EXTENSIONS = frozenset("""
.png .jpg .jpeg .gif .bmp .ico .icns .webp .tif .tiff .psd .xcf .heic .avif .raw .cr2
.pdf .doc .docx .xls .xlsx .ppt .pptx .odt .ods .odp .epub .mobi
.zip .gz .tgz .bz2 .xz .lz .lzma .zst .7z .rar .tar .jar .war .ear .whl .egg .apk .aab .ipa .deb .rpm .dmg .iso
.so .dll .dylib .exe .o .obj .a .lib .ko .pyc .pyo .pyd .class .dex .wasm .bin .elf .out .nib
.woff .woff2 .ttf .otf .eot .fon
.mp3 .mp4 .m4a .wav .ogg .oga .flac .aac .avi .mov .mkv .webm .wmv .flv .mid .midi
.sqlite .sqlite3 .db .mdb .npy .npz .pkl .pickle .pt .pth .ckpt .safetensors .onnx .h5 .hdf5 .tflite .pb .gguf
.parquet .arrow .feather .avro .orc .DS_Store .swp .swo
""".split())


def _extension(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def language_from_name(path: str) -> str | None:
    """The language a path's file name or extension says, or None when only the content could tell."""
    name = path.rsplit("/", 1)[-1]
    lang = _BY_NAME.get(name)
    if lang is not None:
        return lang
    ext = _extension(name)  # already lower case
    if ext:
        lang = _BY_EXT.get(ext)
        if lang is not None:
            return lang
    # Dockerfile.dev, Makefile.linux and friends
    return _BY_NAME.get(name.split(".", 1)[0])


def is_binary_name(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return _extension(name) in BINARY_EXTENSIONS or name == ".DS_Store"


_SHEBANG = re.compile(rb"^#![ \t]*(\S+)(?:[ \t]+(\S+))?(?:[ \t]+(\S+))?")


def language_from_shebang(first_line: bytes) -> str | None:
    """`#!/usr/bin/env python3`, `#!/bin/bash -e`, `#!/usr/bin/env -S node --flag` → a language, or None."""
    m = _SHEBANG.match(first_line)
    if not m:
        return None
    words = [g.decode("latin-1") for g in m.groups() if g]
    prog = os.path.basename(words[0])
    if prog == "env":
        rest = [w for w in words[1:] if not w.startswith("-")]
        if not rest:
            return None
        prog = os.path.basename(rest[0])
    prog = prog.lower()
    lang = _BY_INTERPRETER.get(prog)
    if lang is None:
        # python3.11, ruby2.7, perl5.36: strip the version
        lang = _BY_INTERPRETER.get(re.sub(r"[\d.]+$", "", prog))
    return lang


def needs_shebang(path: str) -> bool:
    """True for files whose name says nothing (no extension, no known name): only a shebang could tell."""
    name = path.rsplit("/", 1)[-1]
    return language_from_name(path) is None and not _extension(name)


def detect(path: str, head: bytes = b"") -> str | None:
    """Name first (cheap and reliable), then the shebang of the first line."""
    lang = language_from_name(path)
    if lang is None and head.startswith(b"#!"):
        lang = language_from_shebang(head.split(b"\n", 1)[0])
    return lang


def category(language: str | None) -> str | None:
    return CATEGORY.get(language) if language else None
