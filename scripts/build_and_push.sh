#!/usr/bin/env bash
# Build the training image (docker/Dockerfile) and push it to Artifact Registry and/or Docker Hub.
#
# Tags: the short git commit (with "-dirty" when the working tree has changes or untracked files) and
# "latest". Give at least one registry:
#   Artifact Registry  --project P [--region us-central1] [--repository dylora]
#                      -> REGION-docker.pkg.dev/P/REPOSITORY/NAME:TAG
#   Docker Hub         --dockerhub USER  -> docker.io/USER/NAME:TAG
# Options (environment variable in brackets):
#   --project P        [GOOGLE_CLOUD_PROJECT]
#   --region R         [DYLORA_AR_REGION, default us-central1]
#   --repository REPO  [DYLORA_AR_REPOSITORY, default dylora]
#   --dockerhub USER   [DOCKERHUB_USER]
#   --name NAME        image name [default dylora-moe]
#   --base-image IMG   FROM image (must carry torch as pinned in constraints.txt)
#   --no-push          build and tag only
#   --dry-run          print every command instead of running it
# Then: dylora submit vertex --image REGION-docker.pkg.dev/P/REPOSITORY/NAME:TAG ...
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
project="${GOOGLE_CLOUD_PROJECT:-}"
region="${DYLORA_AR_REGION:-us-central1}"
repository="${DYLORA_AR_REPOSITORY:-dylora}"
dockerhub="${DOCKERHUB_USER:-}"
name="dylora-moe"
base_image=""
push=1
dry_run=0

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "build_and_push.sh: error: $*" >&2; exit 2; }
value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; printf '%s' "$2"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --project) project="$(value "$@")"; shift 2 ;;
        --region) region="$(value "$@")"; shift 2 ;;
        --repository) repository="$(value "$@")"; shift 2 ;;
        --dockerhub) dockerhub="$(value "$@")"; shift 2 ;;
        --name) name="$(value "$@")"; shift 2 ;;
        --base-image) base_image="$(value "$@")"; shift 2 ;;
        --no-push) push=0; shift ;;
        --dry-run|--dry_run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ -n "$project" || -n "$dockerhub" ]] ||
    die "no registry: give --project P (Artifact Registry) and/or --dockerhub USER (Docker Hub)"

commit="$(git -C "$repo_root" rev-parse --short HEAD 2>/dev/null)" ||
    die "$repo_root is not a git checkout with a commit: the image is tagged with the commit"
if [[ -n "$(git -C "$repo_root" status --porcelain)" ]]; then
    commit="${commit}-dirty"
fi

images=()
[[ -n "$project" ]] && images+=("${region}-docker.pkg.dev/${project}/${repository}/${name}")
[[ -n "$dockerhub" ]] && images+=("docker.io/${dockerhub}/${name}")
tags=()
for image in "${images[@]}"; do
    tags+=("${image}:${commit}" "${image}:latest")
done

run() {
    if [[ "$dry_run" == 1 ]]; then
        printf '%q ' "$@" | sed 's/ $//'
        echo
    else
        "$@"
    fi
}

build=(docker build --file "$repo_root/docker/Dockerfile")
[[ -n "$base_image" ]] && build+=(--build-arg "BASE_IMAGE=${base_image}")
for tag in "${tags[@]}"; do build+=(--tag "$tag"); done
build+=("$repo_root")

run "${build[@]}"
if [[ "$push" == 1 ]]; then
    [[ -n "$project" ]] && run gcloud auth configure-docker "${region}-docker.pkg.dev" --quiet
    for tag in "${tags[@]}"; do run docker push "$tag"; done
fi
echo "image: ${tags[0]}" >&2
