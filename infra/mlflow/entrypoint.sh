#!/bin/sh
# Start `mlflow server --app-name basic-auth` from environment variables only.
#
# Required:  POSTGRES_HOST POSTGRES_DB POSTGRES_USER POSTGRES_PASSWORD
#            MLFLOW_ARTIFACTS_DESTINATION   (s3://bucket/prefix)
#            MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD   (first start only)
#            MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF protection of the auth app)
# Optional:  POSTGRES_PORT (5432), POSTGRES_AUTH_DB (the user store; default POSTGRES_DB),
#            MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_WORKERS (4), AWS_* for S3 (or an IAM role).
set -eu

missing=""
for v in POSTGRES_HOST POSTGRES_DB POSTGRES_USER POSTGRES_PASSWORD MLFLOW_ARTIFACTS_DESTINATION \
         MLFLOW_FLASK_SERVER_SECRET_KEY; do
  eval "val=\${$v:-}"
  [ -n "$val" ] || missing="$missing $v"
done
if [ -n "$missing" ]; then
  echo "mlflow-entrypoint: set these environment variables (from a secret):$missing" >&2
  exit 2
fi

# The password may hold URL-reserved characters: quote it for the SQLAlchemy URL.
pw=$(python -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
db_url="postgresql://${POSTGRES_USER}:${pw}@${POSTGRES_HOST}:${POSTGRES_PORT:-5432}"
export MLFLOW_BACKEND_STORE_URI="${db_url}/${POSTGRES_DB}"

# The auth app reads its user-store URL from an ini file only: write one that only this user
# can read, outside the image, and point MLFLOW_AUTH_CONFIG_PATH at it.
umask 077
auth_ini="$(mktemp -d)/basic_auth.ini"
cat > "$auth_ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${db_url}/${POSTGRES_AUTH_DB:-$POSTGRES_DB}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_ini"
unset pw db_url

exec mlflow server \
  --app-name basic-auth \
  --host 0.0.0.0 --port 5000 \
  --workers "${MLFLOW_WORKERS:-4}" \
  --serve-artifacts \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
