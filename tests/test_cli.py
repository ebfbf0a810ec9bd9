"""``sandbox-kernel install | doctor | gc`` as a user runs them."""

import json
import subprocess
import sys


def test_install_into_a_prefix_points_at_this_interpreter(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sandbox_kernel.cli", "install", "--prefix", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "sandbox"
    assert str(spec_dir) in out
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"] == [sys.executable, "-m", "sandbox_kernel", "-f", "{connection_file}"]
    assert spec["display_name"] == "Sandbox"
    assert spec["interrupt_mode"] == "message"
    assert (spec_dir / "logo-64x64.png").exists()


def test_install_options_are_exclusive():
    result = subprocess.run([sys.executable, "-m", "sandbox_kernel.cli", "install", "--user", "--sys-prefix"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "not allowed with" in result.stderr


def test_doctor_reports_ready_here():
    result = subprocess.run(["sandbox-kernel", "doctor"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "local backend: ready" in result.stdout


def test_doctor_names_what_is_missing(tmp_path):
    # a PATH without the tools: doctor must say which ones and how to install them
    result = subprocess.run([sys.executable, "-m", "sandbox_kernel.cli", "doctor"], capture_output=True,
                            text=True, env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert "apt-get install nftables" in result.stdout
    assert "apt-get install bubblewrap" in result.stdout


def test_kernel_refuses_to_run_code_without_isolation(fresh_kernel, tmp_path):
    kernel = fresh_kernel({"SANDBOX_KERNEL_PYTHON": str(tmp_path / "no-such-python")})
    cell = kernel.execute("open('/tmp/should-not-exist-sandbox', 'w')")
    assert cell.status == "error"
    assert cell.reply["content"]["ename"] == "IsolationUnavailable"
    assert "no code was run" in cell.reply["content"]["evalue"]
    assert cell.sandbox["exit_status"] == 126
