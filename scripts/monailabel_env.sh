#!/usr/bin/env bash
# Makes the MONAI Label 0.8.5 virtual environment that serves the exported cine segmentation bundle
# (docs/monailabel.md): bash scripts/monailabel_env.sh [VENV]   (default .venv-monailabel; PYTHON=python3.11 to choose
# the interpreter, 3.10-3.12). Idempotent: a second run installs nothing new and checks again.
#
# Why not `pip install monailabel==0.8.5`: it resolves 162 packages (sam2, torchvision, openslide, mlflow, numpy 1.26,
# pydicom 3.0.2) and its server does not start: pydicom-seg 0.4.1, imported at server start, needs
# pydicom._storage_sopclass_uids, which pydicom 3 removed. So monailabel is installed with --no-deps beside the pinned
# packages below, each one because the server, the monaibundle app or MONAI Label's writer imports it.
set -euo pipefail

VENV="${1:-.venv-monailabel}"
PYTHON="${PYTHON:-python3}"

# Imported at server start (monailabel.main, interfaces.app, endpoints, datastore, tasks) or by the monaibundle app.
SERVER=(
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 anyio==4.16.0 click==8.5.1  # REST server
    opentelemetry-api==1.45.2 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
    annotated-doc==0.0.7 typing-inspection==0.4.5 python-dotenv==1.2.4 python-multipart==0.0.34  # settings, uploads
    requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3
    requests-toolbelt==1.0.0 retrying==1.4.2  # HTTP clients of the datastores
    dicomweb-client==0.59.3 google-auth==2.63.0 pyasn1==0.6.5 pyasn1_modules==0.4.2 cachetools==8.0.2
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12  # DICOMweb datastore (imported even for a local folder)
    pydicom==2.4.4 pydicom-seg==0.4.1 simpleitk==2.5.7 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
    referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0  # DICOM-SEG conversion (pydicom < 3, see above)
    girder-client==5.0.21 diskcache==5.6.3 shapely==2.2.0  # imported by other apps' code the server loads
    scikit-image==0.26.0 lazy-loader==0.6 imageio==2.38.2 tifffile==2026.3.3
    schedule==1.2.2 timeloop==1.0.2 expiringdict==1.2.2 expiring-dict==1.1.2 sortedcontainers==2.4.0
    watchdog==7.1.0 psutil==7.2.2 passlib==1.7.4 PyJWT==2.15.1 PyYAML==6.0.4  # scheduling, caches, auth
    itk-core==5.4.7 itk-io==5.4.7 pynrrd==1.1.3  # MONAI Label's Writer (NIfTI through ITK)
)
# The bundle's own needs beyond torch and monai (its configs/metadata.json); nibabel needs packaging and, before
# Python 3.12, importlib_resources.
BUNDLE=(nibabel==5.4.2 packaging==26.4 importlib_resources==7.1.0 scipy==1.17.1 pytorch-ignite==0.5.5 tqdm==4.70.1
        pillow==13.0.0)

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
else
    echo "$VENV exists ($("$VENV/bin/python" --version)): installing what is missing"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch pinned: where the CPU build is on disk it is taken; an unpinned torch pulls a multi-GB CUDA build
"${PIP[@]}" torch==2.13.0 monai==1.6.1
"${PIP[@]}" --no-deps monailabel==0.8.5 "${SERVER[@]}" "${BUNDLE[@]}"

# torchvision: monailabel imports torchvision.utils (make_grid, save_image) at module level, used only by 2D debug
# dumps. PyPI's torchvision 0.28.0 (for torch 2.13) links CUDA libraries (libc10_cuda.so) that the CPU torch lacks,
# so `import torchvision` fails ("operator torchvision::nms does not exist"). It is installed where it imports (a CUDA
# torch); otherwise a stand-in package whose two functions raise is written in its place.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "torchvision: $("$VENV/bin/python" -c 'import torchvision; print(torchvision.__version__)')"
else
    "${PIP[@]}" --no-deps torchvision==0.28.0
    if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
        echo "torchvision 0.28.0 installed"
    else
        "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision
        mkdir -p "$SITE/torchvision"
        printf '%s\n' '"""Stand-in for torchvision (scripts/monailabel_env.sh)."""' \
            '' '__version__ = "stand-in (scripts/monailabel_env.sh)"' > "$SITE/torchvision/__init__.py"
        cat > "$SITE/torchvision/utils.py" <<'EOF'
"""Stand-in for torchvision.utils (scripts/monailabel_env.sh): PyPI's torchvision does not load beside the CPU torch;
MONAI Label uses these two only for 2D debug images."""


def make_grid(*args, **kwargs):
    raise NotImplementedError("torchvision is a stand-in in this environment (scripts/monailabel_env.sh)")


def save_image(*args, **kwargs):
    raise NotImplementedError("torchvision is a stand-in in this environment (scripts/monailabel_env.sh)")
EOF
        echo "torchvision: PyPI's build does not load beside this torch; stand-in written to $SITE/torchvision"
    fi
fi

APP="$VENV/monailabel/sample-apps/monaibundle"  # the wheel ships the sample apps
"$VENV/bin/python" - "$APP" <<'EOF'
import sys

sys.path.insert(0, sys.argv[1])
import ignite  # noqa: E402,F401  the bundle's imports first: the server's put setuptools' vendored packages on sys.path
import nibabel  # noqa: E402,F401
import scipy.ndimage  # noqa: E402,F401
import itk  # noqa: E402,F401  MONAI Label's writer
import main  # noqa: E402,F401  the monaibundle app, with every import of the server
import monai  # noqa: E402
import monailabel  # noqa: E402
import torch  # noqa: E402

print(f"ok: monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}; "
      f"monaibundle app {sys.argv[1]}")
EOF
echo "server: $VENV/bin/python -m monailabel.main start_server --app <copy of the app> ... (docs/monailabel.md)"
