#!/usr/bin/env bash
# Deploy samvad to Cloud Run with Firestore, from nothing or over an earlier deploy.
#
#   PROJECT=my-project REGION=europe-west1 deploy/deploy.sh [STEP ...]
#
# Steps (default: all, in this order; each is safe to run again):
#   apis      enable the Google Cloud APIs samvad needs
#   database  create the (default) Firestore database in Native mode, in FIRESTORE_LOCATION
#   account   the service account samvad runs as, with roles/datastore.user
#   secrets   SAMVAD_API_KEYS and SAMVAD_JWT_SECRET in Secret Manager (random when new)
#   indexes   composite indexes, field exemptions and rules from deploy/firestore.indexes.json
#   ttl       TTL policies on the expireAt fields
#   build     build the image with Cloud Build and push it to Artifact Registry
#   run       deploy deploy/service.yaml with that image, open to the internet
#
# Variables: PROJECT (default: gcloud's configured project), REGION (us-central1), SERVICE
# (samvad), FIRESTORE_LOCATION (REGION), REPOSITORY (samvad), TAG (git commit), IMAGE,
# SERVICE_ACCOUNT_NAME (samvad-run), ALLOW_UNAUTHENTICATED (true: samvad checks its own
# API keys and tokens; false leaves Cloud Run's IAM check in front).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
if [[ -z "${PROJECT}" || "${PROJECT}" == "(unset)" ]]; then
    echo "deploy.sh: set PROJECT=<your Google Cloud project id>" >&2
    exit 2
fi
REGION="${REGION:-us-central1}"
SERVICE="${SERVICE:-samvad}"
FIRESTORE_LOCATION="${FIRESTORE_LOCATION:-${REGION}}"
REPOSITORY="${REPOSITORY:-samvad}"
TAG="${TAG:-$(git -C "${ROOT}" rev-parse --short HEAD 2>/dev/null || date +%Y%m%d%H%M%S)}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/${REPOSITORY}/samvad:${TAG}}"
SERVICE_ACCOUNT_NAME="${SERVICE_ACCOUNT_NAME:-samvad-run}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT_NAME}@${PROJECT}.iam.gserviceaccount.com"
ALLOW_UNAUTHENTICATED="${ALLOW_UNAUTHENTICATED:-true}"
INDEXES="${ROOT}/deploy/firestore.indexes.json"

# Collection groups whose documents carry an expireAt timestamp (samvad/store/firestore.py).
TTL_COLLECTION_GROUPS=(
    sessions user_states user_profiles active_users wiped_users deleted_sessions
    snapshots history parts
)
SECRETS=(samvad-api-keys samvad-jwt-secret)

step() { printf '\n== %s\n' "$*" >&2; }
gc() { gcloud --project "${PROJECT}" --quiet "$@"; }
random_token() { head -c 32 /dev/urandom | base64 | tr -d '=+/\n'; }

do_apis() {
    step "enabling APIs"
    gc services enable run.googleapis.com firestore.googleapis.com \
        secretmanager.googleapis.com cloudbuild.googleapis.com artifactregistry.googleapis.com
}

do_database() {
    step "Firestore database (default) in ${FIRESTORE_LOCATION}"
    local kind
    if kind="$(gc firestore databases describe --database='(default)' --format='value(type)' 2>/dev/null)"; then
        if [[ "${kind}" != "FIRESTORE_NATIVE" ]]; then
            echo "deploy.sh: the (default) database is ${kind}; samvad needs Native mode" >&2
            exit 1
        fi
        echo "exists (Native mode)" >&2
    else
        gc firestore databases create --database='(default)' --location="${FIRESTORE_LOCATION}" \
            --type=firestore-native
    fi
}

do_account() {
    step "service account ${SERVICE_ACCOUNT}"
    if ! gc iam service-accounts describe "${SERVICE_ACCOUNT}" >/dev/null 2>&1; then
        gc iam service-accounts create "${SERVICE_ACCOUNT_NAME}" --display-name="samvad on Cloud Run"
    fi
    # Read and write documents; nothing else (no index or database administration at run time).
    gc projects add-iam-policy-binding "${PROJECT}" \
        --member="serviceAccount:${SERVICE_ACCOUNT}" --role=roles/datastore.user \
        --condition=None >/dev/null
}

do_secrets() {
    step "secrets"
    local name
    for name in "${SECRETS[@]}"; do
        if gc secrets describe "${name}" >/dev/null 2>&1; then
            echo "${name}: exists (kept)" >&2
        else
            case "${name}" in
                samvad-api-keys) printf 'admin:%s,agent:%s' "$(random_token)" "$(random_token)" ;;
                samvad-jwt-secret) random_token ;;
            esac | gc secrets create "${name}" --replication-policy=automatic --data-file=-
            echo "${name}: created; read it with: gcloud secrets versions access latest" \
                "--secret=${name} --project=${PROJECT}" >&2
        fi
        # Only samvad's own account may read them.
        gc secrets add-iam-policy-binding "${name}" \
            --member="serviceAccount:${SERVICE_ACCOUNT}" \
            --role=roles/secretmanager.secretAccessor >/dev/null
    done
}

do_indexes() {
    step "indexes and rules from deploy/firestore.indexes.json"
    if command -v firebase >/dev/null 2>&1; then
        (cd "${ROOT}" && firebase deploy --project "${PROJECT}" --non-interactive \
            --only firestore:indexes,firestore:rules)
        return
    fi
    # Without firebase-tools: the same file, one gcloud call per index and per field exemption.
    local line output args
    while IFS= read -r line; do
        read -ra args <<<"${line}"
        echo "gcloud firestore ${args[*]}" >&2
        if ! output="$(gc firestore "${args[@]}" --async 2>&1)"; then
            if [[ "${output}" == *"already exists"* || "${output}" == *"ALREADY_EXISTS"* ]]; then
                echo "  exists" >&2
            else
                echo "${output}" >&2
                return 1
            fi
        fi
    done < <(python3 - "${INDEXES}" <<'PY'
import json
import sys

config = json.load(open(sys.argv[1]))
for index in config["indexes"]:
    args = ["indexes", "composite", "create", f"--collection-group={index['collectionGroup']}",
            f"--query-scope={index['queryScope'].lower().replace('_', '-')}"]
    for field in index["fields"]:
        args.append(f"--field-config=field-path={field['fieldPath']},order={field['order'].lower()}")
    print(" ".join(args))
for override in config["fieldOverrides"]:
    args = ["indexes", "fields", "update", override["fieldPath"],
            f"--collection-group={override['collectionGroup']}"]
    if not override["indexes"]:
        args.append("--disable-indexes")
    else:
        args += [f"--index=order={i['order']}" for i in override["indexes"]]
    print(" ".join(args))
PY
)
    echo "indexes build in the background: gcloud firestore indexes composite list" \
        "--project=${PROJECT}" >&2
}

do_ttl() {
    step "TTL policies (documents are deleted within about a day after expireAt)"
    local group
    for group in "${TTL_COLLECTION_GROUPS[@]}"; do
        gc firestore fields ttls update expireAt --collection-group="${group}" --enable-ttl --async
    done
}

do_build() {
    step "building ${IMAGE}"
    if ! gc artifacts repositories describe "${REPOSITORY}" --location="${REGION}" >/dev/null 2>&1; then
        gc artifacts repositories create "${REPOSITORY}" --location="${REGION}" \
            --repository-format=docker --description="samvad images"
    fi
    gc builds submit "${ROOT}" --region="${REGION}" --tag="${IMAGE}"
}

do_run() {
    step "deploying ${SERVICE} to Cloud Run in ${REGION}"
    MANIFEST="$(mktemp)"
    trap 'rm -f "${MANIFEST}"' EXIT
    local manifest="${MANIFEST}"
    sed -e "s|\${SERVICE}|${SERVICE}|g" \
        -e "s|\${IMAGE}|${IMAGE}|g" \
        -e "s|\${PROJECT}|${PROJECT}|g" \
        -e "s|\${REGION}|${REGION}|g" \
        -e "s|\${SERVICE_ACCOUNT}|${SERVICE_ACCOUNT}|g" \
        "${ROOT}/deploy/service.yaml" >"${manifest}"
    if grep -nF -e "\${" "${manifest}" >&2; then
        echo "deploy.sh: deploy/service.yaml has a placeholder this script does not fill" >&2
        return 1
    fi
    gc run services replace "${manifest}" --region="${REGION}"
    if [[ "${ALLOW_UNAUTHENTICATED}" == "true" ]]; then
        gc run services add-iam-policy-binding "${SERVICE}" --region="${REGION}" \
            --member=allUsers --role=roles/run.invoker >/dev/null
    fi
    local url
    url="$(gc run services describe "${SERVICE}" --region="${REGION}" --format='value(status.url)')"
    echo "samvad is at ${url} (dashboard: ${url}/dashboard)" >&2
}

main() {
    local steps=("$@")
    if [[ ${#steps[@]} -eq 0 || "${steps[0]}" == "all" ]]; then
        steps=(apis database account secrets indexes ttl build run)
    fi
    local s
    for s in "${steps[@]}"; do
        case "${s}" in
            apis | database | account | secrets | indexes | ttl | build | run) "do_${s}" ;;
            *)
                echo "deploy.sh: unknown step '${s}' (see the top of this file)" >&2
                exit 2
                ;;
        esac
    done
}

main "$@"
