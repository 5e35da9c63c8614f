#!/bin/sh
# Publish through Flow's HTTP API (PROTOCOL.md section 10) with nothing but curl, the way
# a PHP, Go or Ruby backend does: one POST with a bearer key and a JSON body, one JSON
# answer. tests/test_api.py runs it against a live API process; it is also the example
# docs/http-api.md shows.
#
#   FLOW_API_URL=http://127.0.0.1:5003 FLOW_API_KEY=... tests/api_curl.sh USER ID DATA_JSON [IDEMPOTENCY_KEY]
#
# Prints the receipt ({"stream","seq","epoch","online"}) and exits 0, or prints the
# error body ({"error": {"code","message"}}) and exits 22 (curl's code for an HTTP error);
# on a 503 it waits Retry-After seconds and tries once more with the same idempotency key,
# so that the retry publishes at most once.
set -eu

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
    echo "usage: FLOW_API_URL=... FLOW_API_KEY=... $0 USER ID DATA_JSON [IDEMPOTENCY_KEY]" >&2
    exit 2
fi
url="${FLOW_API_URL:?set FLOW_API_URL, e.g. http://127.0.0.1:5003}"
: "${FLOW_API_KEY:?set FLOW_API_KEY}"
user=$1 id=$2 data=$3
key=${4:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}

# The body is built with jq, which escapes the user and the id as JSON strings (a shell
# printf would not); DATA_JSON must be JSON already.
body=$(jq -cn --arg user "$user" --arg id "$id" --argjson data "$data" --arg key "$key" \
    '{user: $user, id: $id, data: $data, idempotency_key: $key}')

post() {
    # The key goes to curl on stdin (--config -), never on its command line, where any
    # local user could read it in ps.
    printf 'header = "Authorization: Bearer %s"\n' "$FLOW_API_KEY" |
        curl --silent --show-error --config - \
            --header 'Content-Type: application/json' \
            --data-binary "$body" \
            --max-time 15 \
            --dump-header "$headers" \
            --write-out '%{http_code}' \
            --output "$answer" \
            "$url/api/publish"
}

headers=$(mktemp) answer=$(mktemp)
trap 'rm -f "$headers" "$answer"' EXIT

status=$(post)
if [ "$status" = 503 ]; then
    wait=$(sed -n 's/^[Rr]etry-[Aa]fter: *\([0-9]*\).*/\1/p' "$headers")
    sleep "${wait:-1}"
    status=$(post)
fi
cat "$answer"
echo
[ "$status" = 200 ] || exit 22
