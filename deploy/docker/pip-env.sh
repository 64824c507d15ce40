# shellcheck shell=sh
# Sourced by the Dockerfile's build stages: the build arguments PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
# PIP_TRUSTED_HOST, PIP_FIND_LINKS and EXTRA_CA_PEM become pip's settings; an empty one is no setting at all
# (pip would take an empty PIP_INDEX_URL as an index of nothing).
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_FIND_LINKS; do
    eval "value=\${$var:-}"
    if [ -n "$value" ]; then export "${var?}"; else unset "$var"; fi
done
extra=$(ls /usr/local/share/fedprompt/extra-ca.d/*.pem 2>/dev/null || true)
if [ -n "${EXTRA_CA_PEM:-}" ] || [ -n "$extra" ]; then
    # pip trusts its own bundle (certifi) unless PIP_CERT names one: the system's, plus the extra CAs (their
    # names have no spaces: they are the build context's files, one per line)
    # shellcheck disable=SC2086
    cat /etc/ssl/certs/ca-certificates.crt $extra > /tmp/pip-ca.pem
    [ -z "${EXTRA_CA_PEM:-}" ] || printf '%s\n' "$EXTRA_CA_PEM" >> /tmp/pip-ca.pem
    export PIP_CERT=/tmp/pip-ca.pem
fi
unset extra
unset value
