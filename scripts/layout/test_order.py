"""Tests of the trellis binary's function order (order.py, cc.sh); scripts/test runs them.

  python3 -m unittest discover -s scripts/layout -v"""
import os
import pathlib
import subprocess
import tempfile
import unittest

import order

HERE = pathlib.Path(__file__).resolve().parent


class Stem(unittest.TestCase):
    def test_table(self):
        cases = [
            # legacy Rust symbol: the hash goes, the rest stays
            ("_ZN5tokio7runtime4task3raw4poll17h0123456789abcdefE", "_ZN5tokio7runtime4task3raw4pollE"),
            # a local function LLVM made global in one build and not in another
            ("_ZN4core3fmt5write17hfedcba9876543210E.llvm.1234567890", "_ZN4core3fmt5writeE"),
            # callgrind's recursion levels
            ("_ZN3foo3bar17h00000000000000aaE'2", "_ZN3foo3barE"),
            # std's v0 names and C names have no per-build hash
            ("_RNvNtCsgEmfK2I1SDS_4core3fmt5write", "_RNvNtCsgEmfK2I1SDS_4core3fmt5write"),
            ("aws_lc_0_47_0_SHA256_Update", "aws_lc_0_47_0_SHA256_Update"),
            # not a hash: too short, or not at the end
            ("_ZN3foo17h0123E", "_ZN3foo17h0123E"),
            ("_ZN3foo17h0123456789abcdefE3bar", "_ZN3foo17h0123456789abcdefE3bar"),
        ]
        for name, want in cases:
            with self.subTest(name=name):
                self.assertEqual(order.stem(name), want)


class ExactOrder(unittest.TestCase):
    def test_table(self):
        defined = [
            "_ZN1a4poll17h1111111111111111E",
            "_ZN1a4poll17h2222222222222222E",  # a second instance of one generic function
            "_ZN1b5parse17h3333333333333333E",
            "_ZN1c4main17h4444444444444444E.llvm.77",
            "memcpy",
        ]
        cases = [
            ("exact names, in the list's order",
             ["_ZN1c4main17h4444444444444444E.llvm.77", "_ZN1a4poll17h2222222222222222E"],
             ["_ZN1c4main17h4444444444444444E.llvm.77", "_ZN1a4poll17h2222222222222222E"]),
            ("another build's hash: the one symbol of that stem",
             ["_ZN1b5parse17h9999999999999999E", "_ZN1c4main17h5555555555555555E"],
             ["_ZN1b5parse17h3333333333333333E", "_ZN1c4main17h4444444444444444E.llvm.77"]),
            ("another build's hash of a generic function: not guessed",
             ["_ZN1a4poll17h9999999999999999E"], []),
            ("stale names are left out", ["_ZN1z4gone17h1111111111111111E", "memcpy"], ["memcpy"]),
            ("a symbol named twice is ordered once",
             ["memcpy", "_ZN1b5parse17h3333333333333333E", "_ZN1b5parse17h9999999999999999E", "memcpy"],
             ["memcpy", "_ZN1b5parse17h3333333333333333E"]),
            ("empty list", [], []),
        ]
        for what, listed, want in cases:
            with self.subTest(what):
                self.assertEqual(order.exact_order(listed, defined), want)

    def test_nm_names(self):
        lines = ["0000000000001630 T c\n", "0000000000004010 d _ZN1a1x17h0123456789abcdefE\n", "garbage\n"]
        self.assertEqual(order.nm_names(lines), ["c", "_ZN1a1x17h0123456789abcdefE"])


CALLGRIND = """\
# callgrind format
events: Ir
ob=(1) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(1) ???
fn=(1) memcpy
0 50
ob=(2) /work/bench-out/trellis
fl=(2) ???
fn=(2) _ZN5hyper5proto4h1rt17h0123456789abcdefE
0 100
+3 20
cob=(1)
cfn=(1)
calls=4 0
0 9999
fn=(3) _ZN10serde_yaml5parse17h0123456789abcdefE
0 300
fn=(2)
* 5
fn=(4) _ZN5hyper5proto4h1rt17h0123456789abcdefE'2
0 1
"""


class Executed(unittest.TestCase):
    def test_self_cost_of_the_binary_only(self):
        got = order.executed(CALLGRIND.splitlines(True))
        # a call's inclusive cost is not the caller's; libc's functions are not ours
        self.assertEqual(got, {"_ZN5hyper5proto4h1rt17h0123456789abcdefE": 125,
                               "_ZN5hyper5proto4h1rt17h0123456789abcdefE'2": 1,
                               "_ZN10serde_yaml5parse17h0123456789abcdefE": 300})

    def test_record_hottest_first(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "callgrind.out")
            with open(p, "w") as f:
                f.write(CALLGRIND)
            self.assertEqual(order.record([p, p]),
                             ["_ZN10serde_yaml5parse17h0123456789abcdefE", "_ZN5hyper5proto4h1rt17h0123456789abcdefE"])


def rust_lld_dir():
    """rustup's `gcc-ld` directory (its `ld.lld` is rust-lld) for this host, or None."""
    rustc = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    host = next(l.split()[1] for l in rustc.splitlines() if l.startswith("host:"))
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True)
    d = os.path.join(sysroot.stdout.strip(), "lib", "rustlib", host, "bin", "gcc-ld")
    return d if os.path.isdir(d) else None


@unittest.skipUnless(rust_lld_dir(), "no rust-lld in this toolchain (the dist build links with it)")
class Linker(unittest.TestCase):
    """cc.sh with the real cc and rust-lld, as rustc calls it for the trellis binary."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        d = pathlib.Path(self.dir.name)
        (d / "t.c").write_text("int b(int x) { return x * 3 + 1; }\n"
                               "int a(int x) { return x ^ 5; }\n"
                               "int c(int x) { return x - 7; }\n"
                               "int main(int n, char **v) { return a(b(c(n))); }\n")
        subprocess.run(["cc", "-O1", "-ffunction-sections", "-c", str(d / "t.c"), "-o", str(d / "t.o")], check=True)
        (d / "list.txt").write_text("# hottest first\nc\nb\na\n")
        self.d = d

    def tearDown(self):
        self.dir.cleanup()

    def link(self, out, lld=True, order_list=None, cc=None):
        env = dict(os.environ)
        env.pop("TRELLIS_LINK_ORDER", None)
        if cc is not None:
            env["TRELLIS_LINK_CC"] = cc
        if order_list is not None:
            env["TRELLIS_LINK_ORDER"] = str(order_list)
        args = [str(HERE / "cc.sh"), str(self.d / "t.o"), "-o", str(self.d / out)]
        if lld:
            args += ["-fuse-ld=lld", "-B" + rust_lld_dir()]
        r = subprocess.run(args, env=env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        nm = subprocess.run(["nm", "-n", str(self.d / out)], capture_output=True, text=True, check=True)
        return [l.split()[2] for l in nm.stdout.splitlines() if l.split()[1:2] == ["T"] and l.split()[2] in ("a", "b", "c")]

    def test_orders_the_trellis_binary(self):
        self.assertEqual(self.link("trellis-0123", order_list=self.d / "list.txt"), ["c", "b", "a"])
        self.assertIn("3 names listed, 3 symbols ordered", (self.d / "trellis-0123.order.log").read_text())

    def test_other_outputs_and_no_list_keep_the_default_layout(self):
        self.assertEqual(self.link("build_script_build-01", order_list=self.d / "list.txt"), ["b", "a", "c"])
        self.assertEqual(self.link("trellis-0123"), ["b", "a", "c"])

    def test_a_missing_list_or_a_failed_ordered_link_still_links(self):
        log = self.d / "trellis-0123.order.log"
        self.assertEqual(self.link("trellis-0123", order_list=self.d / "missing.txt"), ["b", "a", "c"])
        self.assertIn("NOT ORDERED", log.read_text().splitlines()[-1])
        # An ordered link that fails (here, a linker flag the linker refuses) keeps the plain
        # link, and the log says so.
        self.assertEqual(self.link("trellis-0123", order_list=self.d / "list.txt",
                                   cc=self.failing_second_link()), ["b", "a", "c"])
        self.assertIn("NOT ORDERED: the ordered link failed", log.read_text().splitlines()[-1])

    def failing_second_link(self):
        """A cc that links like the real one, but fails when asked for a symbol order."""
        fake = self.d / "cc-fails-ordered"
        fake.write_text('#!/bin/sh\ncase "$*" in *symbol-ordering-file*) exit 1;; esac\nexec cc "$@"\n')
        fake.chmod(0o755)
        return str(fake)


if __name__ == "__main__":
    unittest.main()
