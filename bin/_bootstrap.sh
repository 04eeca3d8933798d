# Shared by bin/tmconvert and bin/test: make sure the checkout's .venv exists and holds this package.
# Sourced, not executed. Sets TM_VENV. The first run installs (and says so); later runs return at once.
# Everything it prints goes to stderr, pip's and venv's output included: stdout belongs to the command it starts
# (`bin/tmconvert inspect X --json | jq` on a fresh clone).

tm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TM_VENV="${TMCONVERT_VENV:-$tm_root/.venv}"

tm_say() { printf '\033[1mtmconvert:\033[0m %s\n' "$*" >&2; }

tm_has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# tm_bootstrap EXTRAS: EXTRAS is "" or a pip extras list such as "dev".
tm_bootstrap() {
    local extras="$1" spec="$tm_root" stamp="$TM_VENV/.tmconvert-stamp" want
    [ -n "$extras" ] && spec="$tm_root[$extras]"
    want="$(cat "$tm_root/pyproject.toml" "$tm_root/bin/_bootstrap.sh" | sha256sum | cut -c1-16) extras=$extras"
    if [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
        return 0
    fi
    # a stamp for more extras than asked for also serves
    if [ -f "$stamp" ] && [ -z "$extras" ] && grep -q "^$(echo "$want" | cut -d' ' -f1) " "$stamp"; then
        return 0
    fi

    local py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        tm_say "error: need Python >= 3.10 (set PYTHON=/path/to/python3)"; exit 2
    fi
    local step=1 steps=3
    if [ ! -x "$TM_VENV/bin/python" ]; then
        tm_say "[$step/$steps] creating $TM_VENV (first run only)"
        if tm_has_gpu; then
            # reuse a CUDA torch that the machine already has
            "$py" -m venv --system-site-packages "$TM_VENV" >&2 || exit 1
        else
            "$py" -m venv "$TM_VENV" >&2 || exit 1
        fi
    else
        tm_say "[$step/$steps] updating $TM_VENV (pyproject.toml or extras changed)"
    fi
    step=2
    local pip=("$TM_VENV/bin/python" -m pip install --progress-bar on --disable-pip-version-check)
    if tm_has_gpu; then
        tm_say "[$step/$steps] GPU found: keeping or installing the CUDA build of torch"
    else
        # Without a GPU, pin the CPU build: an unpinned torch pulls several GB of CUDA wheels. The pins go into a
        # constraints file used by every install below, so nothing (timm -> torchvision -> torch) can upgrade
        # torch to a CUDA build later; torchvision is pinned to the release made for that torch.
        # Triton is pinned too: its CPU interpreter (kernel tests) changes between releases (3.6 breaks on runtime
        # loop bounds with numpy 2.4); 3.9.0 is the release the suite is checked with.
        local tv="${TMCONVERT_TORCH:-torch==2.13.0}" tvv="${TMCONVERT_TORCHVISION:-torchvision==0.28.0}"
        local tt="${TMCONVERT_TRITON:-triton==3.9.0}"
        printf '%s\n%s\n%s\n' "$tv" "$tvv" "$tt" >"$TM_VENV/cpu-constraints.txt"
        pip+=(-c "$TM_VENV/cpu-constraints.txt")
        tm_say "[$step/$steps] no GPU: installing the CPU build ($tv) and $tt for the CPU interpreter"
        "${pip[@]}" "$tv" "$tt" >&2 || { tm_say "error: installing $tv failed"; exit 1; }
    fi
    step=3
    tm_say "[$step/$steps] installing tmconvert${extras:+[$extras]} and its dependencies"
    "${pip[@]}" -e "$spec" >&2 || { tm_say "error: installing tmconvert failed"; exit 1; }
    echo "$want" >"$stamp"
    tm_say "ready: $TM_VENV"
}

# Tests and the experiments read real Fashion-MNIST images from Debian's `dataset-fashion-mnist` (31 MB, MIT).
tm_ensure_fashion_mnist() {
    local dir="${TMCONVERT_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
    [ -f "$dir/t10k-images-idx3-ubyte.gz" ] || [ -f "$dir/t10k-images-idx3-ubyte" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        tm_say "installing Debian's dataset-fashion-mnist (31 MB, used by tests that need real images)"
        { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
          { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; } ||
            tm_say "warning: could not install dataset-fashion-mnist; tests reading Fashion-MNIST will fail"
    else
        tm_say "warning: Fashion-MNIST not found in $dir: install Debian's dataset-fashion-mnist or set" \
            "TMCONVERT_FASHION_MNIST to a folder with its IDX files; tests reading it will fail"
    fi
}
