"""The command line as a user meets it: help, version, one-line errors."""

import subprocess
import sys

from click.testing import CliRunner

import fpstore
from fpstore.cli.main import cli
from fpstore.errors import ConfigError, unknown_name


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert fpstore.__version__ in result.output


def test_help_lists_the_pipeline_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "demo", "cohort", "patches", "extract", "sql", "classify", "report"):
        assert command in result.output, command


def test_help_does_not_import_torch():
    # `fpstore --help` must stay fast: command modules import heavy libraries lazily.
    code = "import sys; from fpstore.cli.main import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fpstore_error_prints_one_line_and_exits_nonzero():
    result = CliRunner().invoke(cli, ["synth", "--preset", "nonsense", "--out", "x"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "nonsense" in result.output


def test_unknown_name_lists_valid_choices():
    error = unknown_name("preset", "huge", ["demo", "small"])
    assert isinstance(error, ConfigError)
    assert "'huge'" in str(error) and "demo, small" in str(error)
