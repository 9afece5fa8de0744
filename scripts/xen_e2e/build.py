"""Build what the Xen end-to-end run boots, into a cache reused across runs.

- the Xen 4.17 hypervisor for arm64, from Debian bookworm's xen source
  package (its .orig tarball, sha256-checked against the archive's Sources
  index), with CONFIG_EXPERT and CONFIG_IOREQ_SERVER on: Debian's own
  arm64 build has no IOREQ servers;
- Debian bookworm arm64 packages (Xen's tools and libraries, the kernel,
  busybox, Python 3.11, qemu-storage-daemon, with their dependencies),
  downloaded by apt-get with private state and unpacked with dpkg -x, never
  installed; the kernel is whatever linux-image-arm64 depends on today;
- aarch64 wheels of the bridge's Python dependencies, from PyPI;
- dom0's initramfs: a cached base (the unpacked packages, pruned, the Xen
  kernel modules, the wheels, the guest's kernel, all byte-compiled) plus,
  rebuilt on every run, this project's code, the test scripts and the
  domU's initramfs (the kernel unpacks concatenated cpio archives in turn);
- the domU's initramfs: busybox, virtio-mmio and virtio-blk, and its init.

Every step leaves a finished file behind it only when it succeeded (written
to a temporary name, then renamed), so an interrupted run redoes that step
and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
XEN_SOURCE = "xen"

DOM0_PACKAGES = [
    "xen-utils-4.17",
    "xenstore-utils",
    "libxendevicemodel1",
    "libxenforeignmemory1",
    "libxenevtchn1",
    "libxengnttab1",
    "libxenstore4",
    "busybox-static",
    "mount",
    "python3.11-minimal",
    "libpython3.11-stdlib",
    "qemu-system-common",
    "linux-image-arm64",
]
PYTHON_PACKAGES = ["trio", "attrs", "cffi"]
DOM0_MODULES = ["xen-evtchn", "xen-privcmd", "xen-gntdev", "xen-gntalloc", "xenfs"]
DOMU_MODULES = ["virtio_mmio", "virtio_blk"]
PROJECT_PACKAGES = ["bridge", "vhost_user", "xen"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# Unpacked packages hold far more than dom0 runs: leave out what only costs
# initramfs size (and so boot time under emulation).
PRUNE = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/zoneinfo",
    "usr/share/i18n",
    "usr/share/iso-codes",
    "usr/share/xml",
    "usr/share/qemu",
    "usr/share/initramfs-tools",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/distutils",
    "usr/lib/python3.11/unittest",
    "usr/lib/debug",
    "usr/lib/udev",
    "lib/udev",
    "lib/systemd",
    "usr/lib/aarch64-linux-gnu/gstreamer1.0",
    "usr/lib/aarch64-linux-gnu/gconv",
    "boot",
    "lib/modules",
    "lib/firmware",
]


class BuildError(Exception):
    """A build step failed; the text says which and why."""


def log(message: str) -> None:
    print(f"xen-e2e: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, logfile: Path | None = None, env: dict | None = None) -> None:
    """Run a command; on failure raise BuildError with the tail of its output."""
    out = subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    text = out.stdout.decode("utf-8", "replace")
    if logfile is not None:
        logfile.write_text(text)
    if out.returncode != 0:
        tail = "\n".join(text.splitlines()[-25:])
        where = f" (full output: {logfile})" if logfile is not None else ""
        raise BuildError(f"{' '.join(cmd[:4])} ... failed with exit status {out.returncode}{where}:\n{tail}")


def fetch(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` once (checking sha256 when given)."""
    if dest.exists():
        return dest
    log(f"downloading {url}")
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"cannot download {url}: {exc}") from None
    if sha256 is not None:
        got = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if got != sha256:
            tmp.unlink()
            raise BuildError(f"{url}: sha256 {got}, but the archive's index says {sha256}")
    tmp.rename(dest)
    return dest


# --- the hypervisor -----------------------------------------------------------


def source_entry(sources_xz: Path, package: str) -> dict[str, str]:
    """The newest stanza of ``package`` in a Sources.xz index, as {field: value}
    (continuation lines kept, joined with newlines)."""
    best: dict[str, str] | None = None
    text = lzma.decompress(sources_xz.read_bytes()).decode("utf-8", "replace")
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and last is not None:
                fields[last] += "\n" + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if fields.get("Package") == package:
            best = fields  # a suite lists one version of each source package
    if best is None:
        raise BuildError(f"{package} is not in {sources_xz}")
    return best


def build_xen(cache: Path) -> Path:
    """The hypervisor image (xen/xen), built with IOREQ server support."""
    out = cache / "out" / "xen"
    if out.exists():
        return out
    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "Sources.xz").unlink(missing_ok=True)  # today's index: older versions leave the pool
    index = fetch(f"{MIRROR}/dists/{SUITE}/main/source/Sources.xz", src / "Sources.xz")
    entry = source_entry(index, XEN_SOURCE)
    orig = None
    for line in entry["Checksums-Sha256"].splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].endswith(".orig.tar.xz"):
            orig = parts
    if orig is None:
        raise BuildError(f"no .orig.tar.xz for xen {entry.get('Version')} in {index}")
    sha, _, name = orig
    tarball = fetch(f"{MIRROR}/{entry['Directory']}/{name}", src / name, sha)
    tree = src / f"xen-{entry['Version'].rsplit('-', 1)[0]}"
    if not (tree / "xen" / "Makefile").exists():
        log(f"unpacking {name}")
        with tarfile.open(tarball) as tar:
            tar.extractall(src, filter="tar")
        dirs = [p for p in src.glob("xen-*") if p.is_dir()]
        if not (tree / "xen" / "Makefile").exists():
            raise BuildError(f"{name} did not unpack to {tree} (found {dirs})")
    make = ["make", "-C", "xen", "XEN_TARGET_ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]
    log(f"building the Xen {entry['Version']} hypervisor with CONFIG_IOREQ_SERVER (about a minute)")
    run(make + ["defconfig"], cwd=tree, logfile=cache / "xen-defconfig.log")
    with open(tree / "xen" / ".config", "a") as config:
        config.write("CONFIG_EXPERT=y\nCONFIG_IOREQ_SERVER=y\n")
    run(make + ["olddefconfig"], cwd=tree, logfile=cache / "xen-olddefconfig.log")
    config_text = (tree / "xen" / ".config").read_text()
    if "CONFIG_IOREQ_SERVER=y" not in config_text:
        raise BuildError(f"{tree}/xen/.config lost CONFIG_IOREQ_SERVER=y after olddefconfig")
    run(make + [f"-j{os.cpu_count() or 1}"], cwd=tree, logfile=cache / "xen-build.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tree / "xen" / "xen", out.with_name("xen.part"))
    out.with_name("xen.part").rename(out)
    return out


# --- arm64 packages -----------------------------------------------------------


def apt_options(apt: Path) -> list[str]:
    return [
        f"-oDir::Etc::SourceList={apt}/sources.list",
        "-oDir::Etc::SourceParts=/nonexistent",
        f"-oDir::State::Lists={apt}/lists",
        f"-oDir::State::status={apt}/status",
        f"-oDir::Cache={apt}/cache",
        "-oDir::Etc::Preferences=/nonexistent",
        "-oDir::Etc::PreferencesParts=/nonexistent",
        "-oAPT::Architecture=arm64",
        "-oAPT::Architectures=arm64",
        "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oAPT::Sandbox::User=" + os.environ.get("USER", ""),
        "-oDebug::NoLocking=1",
        "-oAPT::Install-Recommends=false",
    ]


def download_debs(cache: Path, packages: list[str]) -> list[Path]:
    """The .debs of ``packages`` and their dependencies (arm64), downloaded
    with apt-get into a private cache: nothing is installed on this machine."""
    apt = cache / "apt"
    stamp = apt / "downloaded"
    want = " ".join(packages)
    if stamp.exists() and stamp.read_text() == want:
        return sorted((apt / "cache" / "archives").glob("*.deb"))
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").write_text("")
    (apt / "sources.list").write_text(
        f"deb [arch=arm64] {MIRROR} {SUITE} main\ndeb [arch=arm64] {MIRROR} {SUITE}-updates main\n"
    )
    opts = apt_options(apt)
    log("downloading arm64 packages (Xen tools, kernel, Python, qemu-storage-daemon)")
    run(["apt-get", *opts, "-q", "update"], logfile=cache / "apt-update.log")
    # A fresh download set: drop .debs of older versions first.
    for old in (apt / "cache" / "archives").glob("*.deb"):
        old.unlink()
    run(["apt-get", *opts, "-q", "-y", "--download-only", "install", *packages], logfile=cache / "apt-download.log")
    stamp.write_text(want)
    return sorted((apt / "cache" / "archives").glob("*.deb"))


def unpack_debs(debs: list[Path], dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(tmp)])
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def kernel_tree(cache: Path, debs: list[Path]) -> Path:
    """linux-image-<version>-arm64 unpacked: whichever version
    linux-image-arm64 depends on today."""
    images = [d for d in debs if re.match(r"linux-image-\d.*-arm64_", d.name)]
    if len(images) != 1:
        raise BuildError(f"expected one linux-image-<version>-arm64 package among the downloads, found {images}")
    dest = cache / "kernel" / images[0].name.removesuffix(".deb")
    if not (dest / "boot").is_dir():
        log(f"unpacking {images[0].name}")
        for old in (cache / "kernel").glob("linux-image-*"):
            shutil.rmtree(old)
        unpack_debs(images, dest)
    return dest


def kernel_image(tree: Path) -> tuple[Path, str]:
    found = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise BuildError(f"expected one boot/vmlinuz-* in {tree}, found {found}")
    return found[0], found[0].name.removeprefix("vmlinuz-")


def module_files(tree: Path, version: str, names: list[str]) -> list[Path]:
    """The .ko files of ``names`` and of the modules they depend on, in load
    order (dependencies first), read from each module's .modinfo."""
    root = tree / "lib" / "modules" / version
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in root.rglob("*.ko")}
    order: list[Path] = []

    def add(name: str) -> None:
        key = name.replace("-", "_")
        path = index.get(key)
        if path is None:
            raise BuildError(f"module {name} is not in {root} (built in, or renamed?)")
        if path in order:
            return
        m = re.search(rb"\0depends=([^\0]*)\0", b"\0" + path.read_bytes())
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            add(dep)
        order.append(path)

    for name in names:
        add(name)
    return order


# --- Python for dom0 ------------------------------------------------------------


def download_wheels(cache: Path) -> list[Path]:
    wheels = cache / "wheels"
    stamp = wheels / "downloaded"
    want = " ".join(PYTHON_PACKAGES)
    if not (stamp.exists() and stamp.read_text() == want):
        log("downloading aarch64 wheels of " + want)
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir(parents=True)
        pip = [sys.executable, "-m", "pip"]
        if subprocess.run(pip + ["--version"], capture_output=True).returncode != 0:
            pip = ["pip3"]
        run(
            pip
            + ["download", "-q", "--platform", "manylinux2014_aarch64", "--only-binary=:all:",
               "--python-version", "3.11", "--implementation", "cp", "-d", str(wheels), *PYTHON_PACKAGES],
            logfile=cache / "pip-download.log",
        )
        stamp.write_text(want)
    return sorted(wheels.glob("*.whl"))


# --- initramfs ----------------------------------------------------------------


def write_cpio(root: Path, out: Path) -> None:
    """An uncompressed newc archive of ``root`` (owned by root): the kernel
    unpacks it without a decompressor, which matters under emulation."""
    tmp = out.with_name(out.name + ".part")
    names = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=root, check=True, capture_output=True
    ).stdout
    with open(tmp, "wb") as sink:
        proc = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root, input=names, stdout=sink,
            stderr=subprocess.PIPE,
        )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"cpio of {root} failed: {proc.stderr.decode(errors='replace')}")
    tmp.rename(out)


def install_modules(tree: Path, version: str, names: list[str], dest: Path) -> None:
    mods = dest / "lib" / "modules"
    mods.mkdir(parents=True, exist_ok=True)
    order = module_files(tree, version, names)
    for path in order:
        shutil.copy(path, mods / path.name)
    (mods / "load-order").write_text("".join(p.name + "\n" for p in order))


def busybox_links(root: Path) -> None:
    """/bin/sh and friends as links to busybox (the applets the scripts use)."""
    for name in BUSYBOX_APPLETS:
        for d in ("bin", "sbin", "usr/bin", "usr/sbin"):
            if (root / d / name).exists() or (root / d / name).is_symlink():
                break
        else:
            (root / "bin" / name).symlink_to("busybox")


BUSYBOX_APPLETS = (
    "sh ash mount umount mkdir cat echo sleep insmod ls ps kill grep sed awk head tail dd sha256sum cmp "
    "printf poweroff reboot halt sync seq tr wc cut test [ rm cp mv ln dmesg truncate stat od xxd hexdump "
    "yes readlink timeout date uname tee find chmod env true false basename dirname mknod hostname ip ifconfig sort uniq"
).split()


def build_dom0_base(cache: Path, debs: list[Path], tree: Path, version: str, wheels: list[Path]) -> Path:
    """dom0's initramfs without this project: packages, modules, wheels."""
    key = hashlib.sha256(
        "\n".join([d.name for d in debs] + [w.name for w in wheels] + DOM0_MODULES + PRUNE).encode()
    ).hexdigest()[:16]
    out = cache / "out" / f"dom0-base-{key}.cpio"
    if out.exists():
        return out
    log("assembling dom0's root file system")
    root = cache / "dom0-root"
    unpack_debs([d for d in debs if not d.name.startswith("linux-image")], root)
    for rel in PRUNE:
        shutil.rmtree(root / rel, ignore_errors=True)
    # Debian's busybox-static is /bin/busybox; merged /usr is a packaging
    # convention the unpacked tree does not have, so make the links here.
    for d in ("bin", "sbin", "lib"):
        if not (root / d).exists():
            (root / d).symlink_to(f"usr/{d}")
    busybox_links(root)
    install_modules(tree, version, DOM0_MODULES, root)
    (root / "xvb").mkdir(exist_ok=True)
    shutil.copy(kernel_image(tree)[0], root / "xvb" / "vmlinuz")  # the domU's kernel
    site = root / "usr" / "lib" / "python3" / "dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    for sub in ("proc", "sys", "dev", "tmp", "run", "var/run/xen", "var/lib/xen", "var/log/xen/console",
                "var/lib/xenstored", "etc/xen", "xvb"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # Byte-compile what dom0 imports: Debian compiles Python modules when a
    # package is installed, and an unpacked tree has no .pyc files. Under
    # emulation compiling the stdlib at every boot would cost seconds.
    compile_tree(root / "usr" / "lib" / "python3.11", strip=root)
    compile_tree(site, strip=root)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob("dom0-base-*.cpio"):
        stale.unlink()
    write_cpio(root, out)
    shutil.rmtree(root)
    return out


def compile_tree(path: Path, *, strip: Path) -> None:
    """compileall with this host's Python 3.11 (the same bytecode as dom0's);
    the recorded source paths are dom0's."""
    if sys.version_info[:2] != (3, 11):
        log(f"not byte-compiling {path}: this is Python {sys.version_info[0]}.{sys.version_info[1]}, dom0 runs 3.11")
        return
    run([sys.executable, "-m", "compileall", "-q", "-j0", "-s", str(strip), "-p", "/",
         "--invalidation-mode", "unchecked-hash", str(path)], logfile=None)


def build_dom0_overlay(cache: Path, work: Path, domu: Path) -> Path:
    """This project, the dom0 test scripts and the domU's initramfs: a small
    cpio rebuilt on every run."""
    root = work / "dom0-overlay"
    shutil.rmtree(root, ignore_errors=True)
    app = root / "xvb" / "app"
    app.mkdir(parents=True)
    shutil.copy(domu, root / "xvb" / "domu.cpio")
    for pkg in PROJECT_PACKAGES:
        shutil.copytree(REPO / pkg, app / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    compile_tree(app, strip=root)
    shutil.copy(HERE / "dom0_init.sh", root / "init")
    shutil.copy(HERE / "dom0_test.sh", root / "xvb" / "test.sh")
    shutil.copy(HERE / "check_image.sh", root / "xvb" / "check_image.sh")
    shutil.copy(HERE / "patterns.sh", root / "xvb" / "patterns.sh")
    for f in (root / "init", root / "xvb" / "test.sh", root / "xvb" / "check_image.sh"):
        f.chmod(0o755)
    out = work / "dom0-overlay.cpio"
    write_cpio(root, out)
    shutil.rmtree(root)
    return out


def build_domu(cache: Path, debs: list[Path], tree: Path, version: str, work: Path) -> Path:
    """The guest's initramfs: busybox, virtio-mmio and virtio-blk, the test."""
    root = work / "domu-root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "bin").mkdir(parents=True)
    busybox = [d for d in debs if d.name.startswith("busybox-static_")]
    if len(busybox) != 1:
        raise BuildError(f"expected one busybox-static package, found {busybox}")
    unpack = work / "busybox"
    unpack_debs(busybox, unpack)
    shutil.copy(unpack / "bin" / "busybox", root / "bin" / "busybox")
    shutil.rmtree(unpack)
    busybox_links(root)
    for sub in ("proc", "sys", "dev", "tmp"):
        (root / sub).mkdir()
    install_modules(tree, version, DOMU_MODULES, root)
    shutil.copy(HERE / "domu_init.sh", root / "init")
    shutil.copy(HERE / "patterns.sh", root / "patterns.sh")
    (root / "init").chmod(0o755)
    out = work / "domu.cpio"
    write_cpio(root, out)
    shutil.rmtree(root)
    return out


def concat(parts: list[Path], out: Path) -> Path:
    with open(out, "wb") as sink:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, sink, 1 << 20)
    return out


def forget_downloads(cache: Path) -> None:
    """Make the next build_all fetch today's packages, wheels and Xen source
    again (and so the kernel linux-image-arm64 points at today)."""
    for stamp in (cache / "apt" / "downloaded", cache / "wheels" / "downloaded", cache / "out" / "xen"):
        stamp.unlink(missing_ok=True)


LOCK_WAIT = 1800.0


@contextlib.contextmanager
def cache_lock(cache: Path):
    """One run at a time fills the cache (two test suites may run at once);
    a run that finds it filled only reads it."""
    with open(cache / ".lock", "w") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        told = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    log(f"waiting for another run to finish filling {cache}")
                    told = True
                if time.monotonic() > deadline:
                    raise BuildError(f"{cache} stayed locked by another run for {LOCK_WAIT:.0f} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_all(cache: Path, work: Path) -> dict[str, Path]:
    """Everything the run boots: {"xen", "kernel", "dom0_initrd", "domu_initrd"}."""
    cache.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache):
        xen = build_xen(cache)
        debs = download_debs(cache, DOM0_PACKAGES)
        tree = kernel_tree(cache, debs)
        kernel, version = kernel_image(tree)
        log(f"kernel {version}")
        wheels = download_wheels(cache)
        base = build_dom0_base(cache, debs, tree, version, wheels)
    domu = build_domu(cache, debs, tree, version, work)
    overlay = build_dom0_overlay(cache, work, domu)
    dom0 = concat([base, overlay], work / "dom0.cpio")
    overlay.unlink()
    return {"xen": xen, "kernel": kernel, "dom0_initrd": dom0, "domu_initrd": domu, "kernel_version": version}


def main() -> int:
    cache = Path(os.environ.get("XEN_E2E_CACHE", REPO / ".cache" / "xen-e2e"))
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name, path in build_all(cache, work).items():
            print(f"{name}={path}")
    except BuildError as exc:
        log(f"build failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
