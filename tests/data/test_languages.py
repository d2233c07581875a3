"""Language detection by extension, file name and shebang, over 30+ languages."""

import pytest

from refact_lab.data import languages


@pytest.mark.parametrize("path,lang", [
    ("a.py", "Python"), ("a.pyi", "Python"), ("a.js", "JavaScript"), ("a.mjs", "JavaScript"), ("a.jsx", "JavaScript"),
    ("a.ts", "TypeScript"), ("a.tsx", "TypeScript"), ("A.java", "Java"), ("a.kt", "Kotlin"), ("a.scala", "Scala"),
    ("a.c", "C"), ("a.h", "C"), ("a.cpp", "C++"), ("a.hpp", "C++"), ("a.cu", "CUDA"), ("a.cs", "C#"),
    ("a.go", "Go"), ("a.rs", "Rust"), ("a.swift", "Swift"), ("a.m", "Objective-C"), ("a.rb", "Ruby"),
    ("a.php", "PHP"), ("a.pl", "Perl"), ("a.lua", "Lua"), ("a.R", "R"), ("a.jl", "Julia"), ("a.dart", "Dart"),
    ("a.hs", "Haskell"), ("a.ml", "OCaml"), ("a.ex", "Elixir"), ("a.erl", "Erlang"), ("a.clj", "Clojure"),
    ("a.zig", "Zig"), ("a.f90", "Fortran"), ("a.sh", "Shell"), ("a.ps1", "PowerShell"), ("a.sql", "SQL"),
    ("a.vue", "Vue"), ("a.html", "HTML"), ("a.css", "CSS"), ("a.scss", "SCSS"), ("a.md", "Markdown"),
    ("a.json", "JSON"), ("a.yaml", "YAML"), ("a.toml", "TOML"), ("a.proto", "Protocol Buffer"), ("a.tf", "HCL"),
    ("Makefile", "Makefile"), ("src/Dockerfile", "Dockerfile"), ("Dockerfile.dev", "Dockerfile"),
    ("CMakeLists.txt", "CMake"), ("Gemfile", "Ruby"), ("Jenkinsfile", "Groovy"), ("a.PY", "Python"),
    ("a.pyx", "Cython"), ("a.sol", "Solidity"),
])
def test_by_name(path, lang):
    assert languages.detect(path) == lang


@pytest.mark.parametrize("line,lang", [
    (b"#!/usr/bin/env python3", "Python"), (b"#!/usr/bin/python3.11 -u", "Python"), (b"#!/bin/bash -e", "Shell"),
    (b"#!/bin/sh", "Shell"), (b"#!/usr/bin/env node", "JavaScript"), (b"#!/usr/bin/env -S deno run", "JavaScript"),
    (b"#!/usr/bin/env ruby", "Ruby"), (b"#!/usr/bin/perl -w", "Perl"), (b"#! /usr/bin/env php", "PHP"),
    (b"#!/usr/bin/env Rscript", "R"), (b"#!/usr/bin/env lua5.4", "Lua"), (b"not a shebang", None),
])
def test_by_shebang(line, lang):
    assert languages.detect("bin/tool", line + b"\nrest\n") == lang


def test_covers_at_least_thirty_programming_languages():
    code = [n for n in languages.LANGUAGES if languages.category(n) == languages.PROGRAMMING]
    assert len(code) >= 30


def test_binary_names_and_unknowns():
    assert languages.is_binary_name("img/logo.PNG") and languages.is_binary_name("lib/_x.cpython-311.so")
    assert not languages.is_binary_name("a.py")
    assert languages.detect("data.weird") is None and languages.needs_shebang("bin/tool")
    assert not languages.needs_shebang("data.weird")
