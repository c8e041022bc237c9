"""Build the page `dvc plots show` fills (.dvc/config: plots.html_template = plots.html), with
vega, vega-lite and vega-embed inlined, so the plots render with no network (DVC's own page
loads them from a CDN).

The three packages come from the npm registry with npm's own client (`npm pack`, pinned versions)
and are checked against their pinned sha512 integrity before use. Usage (`make setup` runs it):

    python scripts/plots_page.py [.dvc/plots.html]
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from steerline.core.io import atomic_path

# (package, version, npm integrity of the tarball, file inside it); BSD-3-Clause, all three
PACKAGES = (
    ("vega", "5.33.1", "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCav"
     "Y1LcrbHUskQbGUP8gXOzyQw==", "package/build/vega.min.js"),
    ("vega-lite", "5.23.0", "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2"
     "gN2gs/y4DYTs/RPoTeYAuEg6mA==", "package/build/vega-lite.min.js"),
    ("vega-embed", "6.29.0", "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/"
     "GzdrkceXFma+FDHNXUppKuM0U6Q==", "package/build/vega-embed.min.js"),
)

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>steerline plots</title>
{scripts}
<style>
  body {{ font-family: sans-serif; margin: 16px; }}
  body > div {{ display: inline-block; vertical-align: top; margin: 8px; }}
  img {{ max-width: 900px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(name: str, version: str, expected: str, member: str, workdir: Path) -> str:
    """The member file of the npm tarball name@version, after checking the tarball's hash."""
    try:
        out = subprocess.run(["npm", "pack", f"{name}@{version}", "--json", "--silent",
                              "--pack-destination", str(workdir)], capture_output=True,
                             text=True, check=True).stdout
    except FileNotFoundError:
        sys.exit("plots_page: npm not found: install Node.js and npm (Debian: apt-get install "
                 "nodejs npm)")
    except subprocess.CalledProcessError as err:
        sys.exit(f"plots_page: `npm pack {name}@{version}` failed: {err.stderr.strip()[:300]}")
    tarball = workdir / json.loads(out)[0]["filename"]
    got = integrity(tarball.read_bytes())
    if got != expected:
        sys.exit(f"plots_page: {tarball.name} has integrity {got}, expected {expected}")
    with tarfile.open(tarball) as tar:
        text = tar.extractfile(member).read().decode()
    return text.replace("</script", "<\\/script")  # never closes the inline <script> early


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".dvc/plots.html")
    with tempfile.TemporaryDirectory() as tmp:
        scripts = "\n".join(
            f"<!-- {name}@{version} -->\n<script>{fetch(name, version, sri, member, Path(tmp))}"
            "</script>" for name, version, sri, member in PACKAGES)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp_out:
        Path(tmp_out).write_text(PAGE.format(scripts=scripts))
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB: "
          + ", ".join(f"{n}@{v}" for n, v, _, _ in PACKAGES) + " inlined)")


if __name__ == "__main__":
    main()
