"""Host-side unit tests: no kernel, no tracefs, no root; fake trees under tmp_path.

A package, so that test modules may share names with tests/kernel (test_capture.py).
"""
