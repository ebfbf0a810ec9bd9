"""The standard Jupyter kernel conformance suite, against the real Sandbox kernel."""

import jupyter_kernel_test


class SandboxKernelConformance(jupyter_kernel_test.KernelTests):
    kernel_name = "sandbox"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
         "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
         "mime": "text/latex"},
    ]
    code_execute_result = [
        {"code": "6*7", "result": "42"},
        {"code": "'hello'", "result": "'hello'"},
    ]
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"
    code_generate_error = "raise ValueError('boom')"
    code_page_something = "zip?"
    # the kernel keeps the history of its cells (sandbox_kernel/history.py)
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "6*7"
