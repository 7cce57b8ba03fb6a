"""Secrets for a cloud job: references at submit time, values only inside the container.

A job spec never holds a secret's value. ``--secret WANDB_API_KEY=projects/P/secrets/S/versions/V``
puts the *reference* in the job; the container resolves it at start through Secret Manager
(``google-cloud-secret-manager``) into its own environment. Messages name the variable and the
secret's resource name, never the value.

``DYLORA_SECRET_MANAGER_ENDPOINT`` points the client at another endpoint (a private one, or a test
server); credentials are the container's Application Default Credentials.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DyLoRAError
from .api_errors import server_message

# The variables that carry credentials: what --pass_env_secrets takes from the submitting shell.
SECRET_ENV_NAMES = ("WANDB_API_KEY", "HF_TOKEN")
ENDPOINT_ENV = "DYLORA_SECRET_MANAGER_ENDPOINT"

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESOURCE_RE = re.compile(r"^projects/[^/\s]+/(locations/[^/\s]+/)?secrets/[^/\s]+/versions/[^/\s]+$")
_FORM = "NAME=projects/PROJECT/secrets/SECRET/versions/VERSION (VERSION may be 'latest')"


class SecretError(DyLoRAError):
    """A secret the job refers to cannot be read (missing, no permission, endpoint down)."""


@dataclass(frozen=True)
class SecretRef:
    """An environment variable to fill from a Secret Manager secret version."""

    env: str
    resource: str

    def __str__(self) -> str:
        return f"{self.env}={self.resource}"


def parse_secret_ref(text: str) -> SecretRef:
    """``NAME=projects/P/secrets/S/versions/V`` (a value in place of the reference is refused)."""
    env, sep, resource = text.partition("=")
    if not sep or not _ENV_NAME_RE.match(env):
        raise ConfigError(f"--secret {_describe(text)} is invalid: expected {_FORM}.")
    if not _RESOURCE_RE.match(resource):
        # The right-hand side may be the secret itself, pasted by mistake: never echo it.
        raise ConfigError(f"--secret {env}=... is not a Secret Manager reference: expected {_FORM}. "
                          "Secret values never go into a job; store the value in Secret Manager and "
                          "pass its reference, or use --pass_env_secrets.")
    return SecretRef(env, resource)


def _describe(text: str) -> str:
    """The variable name part only: whatever follows '=' may be a value."""
    name = text.partition("=")[0]
    return repr(name + "=...") if "=" in text else repr(name[:40])


def parse_secret_refs(texts: list[str] | None) -> list[SecretRef]:
    refs = [parse_secret_ref(t) for t in texts or []]
    seen: set[str] = set()
    for ref in refs:
        if ref.env in seen:
            raise ConfigError(f"--secret {ref.env} is given twice: give each variable once.")
        seen.add(ref.env)
    return refs


def secret_manager_client() -> Any:
    """The real Secret Manager client (REST), at ``DYLORA_SECRET_MANAGER_ENDPOINT`` if set."""
    try:
        from google.api_core.client_options import ClientOptions
        from google.cloud import secretmanager_v1
    except ImportError as e:
        raise SecretError("resolving --secret references needs google-cloud-secret-manager "
                          "(pip install google-cloud-secret-manager: the cloud extra), which is not installed.") from e
    endpoint = os.environ.get(ENDPOINT_ENV)
    options = ClientOptions(api_endpoint=endpoint) if endpoint else None
    return secretmanager_v1.SecretManagerServiceClient(transport="rest", client_options=options)


def resolve_secrets(refs: list[SecretRef], client: Any = None,
                    environ: dict[str, str] | None = None) -> list[str]:
    """Read every secret and put it into ``environ`` (default: this process's environment).

    Returns the names of the variables set. Every failure names the variable and the resource.
    """
    environ = os.environ if environ is None else environ
    if not refs:
        return []
    client = client or secret_manager_client()
    from google.api_core import exceptions as gexc

    for ref in refs:
        try:
            response = client.access_secret_version(name=ref.resource, timeout=30)
        except gexc.NotFound as e:
            raise SecretError(f"secret {ref.resource} (for {ref.env}) does not exist or has no such "
                              "version: create it with `gcloud secrets create` / `gcloud secrets "
                              "versions add`, or fix the --secret reference.") from e
        except (gexc.PermissionDenied, gexc.Forbidden) as e:
            raise SecretError(f"no permission to read secret {ref.resource} (for {ref.env}): grant "
                              "the job's service account roles/secretmanager.secretAccessor on it.") from e
        except gexc.GoogleAPIError as e:
            raise SecretError(f"cannot read secret {ref.resource} (for {ref.env}): "
                              f"{type(e).__name__}: {server_message(e)}") from e
        except Exception as e:  # transport errors (connection refused, DNS) and auth failures
            raise SecretError(f"cannot read secret {ref.resource} (for {ref.env}): "
                              f"{type(e).__name__}: {e}") from e
        try:
            value = response.payload.data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SecretError(f"secret {ref.resource} (for {ref.env}) is not UTF-8 text; an "
                              "environment variable needs text.") from e
        environ[ref.env] = value
    return [ref.env for ref in refs]
