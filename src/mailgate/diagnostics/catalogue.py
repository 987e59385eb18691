"""The error catalogue: a failure's cause and the concrete fix, in the admin's words.

One catalogue for everything that reports a failure (the worker's attempt log, the test e-mail,
the API), so the same refusal is explained the same way everywhere. Facts and fixes come from
`shared/reference/mail-providers.md` (§4 Entra, §5.8 Graph, §6 Google), with their sources there.

`broken` says the failure is about the mail server's settings or permissions, not the message:
trying again unchanged cannot help, so the server is marked broken and its messages wait.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Explanation:
    cause: str
    fix: str
    transient: bool = False
    broken: bool = True

    def __str__(self) -> str:
        return f"{self.cause} Fix: {self.fix}" if self.fix else self.cause


def _e(cause: str, fix: str, *, transient: bool = False, broken: bool = True) -> Explanation:
    return Explanation(cause, fix, transient, broken and not transient)


_RETRY = "Nothing to change: mailgate tries again with backoff."
_SIGN_IN_AGAIN = "An admin connects the mailbox again (consent): the stored grant no longer works."

# Microsoft Entra ID token endpoint errors, by AADSTS code (reference §4).
AADSTS: dict[int, Explanation] = {
    7000215: _e("The client secret is wrong (AADSTS7000215). Most often the secret's ID was pasted instead of "
                "its value.", "In Entra ID, App registrations → the app → Certificates & secrets: copy the secret's "
                "Value (shown once, when it is created; make a new one if needed), not its Secret ID, and save it "
                "in the mail server settings."),
    7000222: _e("The client secret has expired (AADSTS7000222).",
                "Create a new client secret for the app in Entra ID (Certificates & secrets) and save its value "
                "in the mail server settings."),
    7000218: _e("The token request carried no client secret (AADSTS7000218), and the app is a confidential client.",
                "Save the app's client secret in the mail server settings."),
    700016: _e("Entra ID does not know this application (client) id in this directory (AADSTS700016): a wrong client "
               "id, a wrong directory (tenant) id, or a multi-tenant app nobody consented to in this directory.",
               "Check the Application (client) ID and the Directory (tenant) ID on the app's Overview page; for "
               "an app of another organization, have an admin of this directory grant consent."),
    90002: _e("The directory (tenant) does not exist (AADSTS90002): a wrong directory id or domain, or the wrong "
              "cloud (authority).", "Use the Directory (tenant) ID GUID from Entra ID's Overview page, and the "
              "authority of the cloud the tenant lives in (e.g. https://login.microsoftonline.us for US Government)."),
    90094: _e("An administrator must consent to this app's permissions (AADSTS90094).",
              "A Global or Privileged Role Administrator grants admin consent for the app in Entra ID "
              "(API permissions → Grant admin consent)."),
    65001: _e("Nobody has consented to the permissions this app asks for (AADSTS65001).",
              "Grant consent: for client credentials an admin presses \"Grant admin consent\" under API permissions; "
              "for a delegated grant, connect the mailbox again."),
    70011: _e("The scope is not valid (AADSTS70011): SMTP.SendAsApp asked for delegated, or a malformed resource URL.",
              "Use https://outlook.office365.com/.default (SMTP, app-only), https://outlook.office.com/SMTP.Send "
              "(SMTP, delegated) or https://graph.microsoft.com/.default (Graph, app-only)."),
    1002012: _e("The scope is not valid for a client credentials grant (AADSTS1002012): it must be a resource's "
                "/.default.", "Use https://outlook.office365.com/.default for SMTP or "
                "https://graph.microsoft.com/.default for Graph."),
    700082: _e("The refresh token expired because it was not used for a long time (AADSTS700082).", _SIGN_IN_AGAIN),
    70008: _e("The refresh token or authorization code has expired (AADSTS70008).", _SIGN_IN_AGAIN),
    50173: _e("The grant was revoked (AADSTS50173): the user's password changed or an admin revoked the sessions.",
              _SIGN_IN_AGAIN),
    50076: _e("Multi-factor authentication is required (AADSTS50076).", _SIGN_IN_AGAIN),
    50079: _e("The user must register for multi-factor authentication (AADSTS50079).", _SIGN_IN_AGAIN),
    53003: _e("Conditional Access blocked the sign-in (AADSTS53003).",
              "An Entra ID admin reviews the Conditional Access policies (sign-in logs show which one applied)."),
    530035: _e("Security defaults blocked the request (AADSTS530035).",
               "Use OAuth (as configured here) and have an admin review the sign-in logs and security defaults."),
    54005: _e("The authorization code was already used (AADSTS54005).", "Connect the mailbox again."),
    501481: _e("The PKCE code verifier does not match the challenge (AADSTS501481).", "Connect the mailbox again."),
    50148: _e("The redirect URI differs from the one of the consent request (AADSTS50148).",
              "Connect the mailbox again; check that mailgate's public URL is the one registered for the app."),
    50194: _e("The app is single-tenant and cannot use the common endpoint (AADSTS50194).",
              "Set directory_id to the tenant's id instead of common or organizations."),
    50034: _e("The user account does not exist in this directory (AADSTS50034).",
              "Check the user name and the directory (tenant) id."),
    50126: _e("Invalid user name or password (AADSTS50126).", "Check the credentials; prefer OAuth consent."),
    700024: _e("The client assertion is outside its valid time range (AADSTS700024): the clock is off.",
               "Synchronize this machine's clock (NTP)."),
    700027: _e("The client assertion's signature is not valid (AADSTS700027).",
               "Upload the right certificate to the app registration."),
    50196: _e("Entra ID saw too many identical token requests (AADSTS50196).", _RETRY, transient=True),
    90024: _e("Entra ID is temporarily unavailable (AADSTS90024).", _RETRY, transient=True),
    90006: _e("Entra ID had a temporary internal error (AADSTS90006).", _RETRY, transient=True),
    50033: _e("Entra ID could not complete the request for now (AADSTS50033).", _RETRY, transient=True),
}  # fmt: skip

# Generic OAuth 2.0 `error` values (RFC 6749 §5.2) and what they mean here.
OAUTH: dict[str, Explanation] = {
    "invalid_client": _e("The token endpoint refused the client credentials (invalid_client): the client id or "
                         "secret is wrong, expired or revoked.",
                         "Check the client id, and save a current client secret value in the mail server settings."),
    "unauthorized_client": _e("The client may not use this grant, or the token endpoint does not know it "
                              "(unauthorized_client).",
                              "Check the client id and that the app registration allows this grant type."),
    "invalid_grant": _e("The grant was refused (invalid_grant): the refresh token or authorization code expired or "
                        "was revoked (Google: an app in Testing status gets refresh tokens that last 7 days).",
                        "An admin connects the mailbox again (or saves a new refresh token)."),
    "invalid_scope": _e("The scope is not valid (invalid_scope).", "Check the scope in the token source settings."),
    "invalid_request": _e("The token endpoint refused the request as malformed (invalid_request).",
                          "Check the token URL, client id and scope; if they are right, report it with the "
                          "endpoint's message."),
    "unsupported_grant_type": _e("The token endpoint does not support this grant (unsupported_grant_type).",
                                 "Choose the grant the provider supports (Google: refresh_token or delegated)."),
    "access_denied": _e("Consent was denied (access_denied).", "Connect the mailbox again and accept."),
    "interaction_required": _e("The user must sign in interactively (interaction_required).", _SIGN_IN_AGAIN),
    "consent_required": _e("Consent is required (consent_required).", _SIGN_IN_AGAIN),
    "temporarily_unavailable": _e("The token endpoint is temporarily unavailable.", _RETRY, transient=True),
    "server_error": _e("The token endpoint had an internal error.", _RETRY, transient=True),
}  # fmt: skip

_GRAPH_PERMISSION = ("In Entra ID, give the app the Microsoft Graph application permission Mail.Send (and "
                     "Mail.ReadWrite for large attachments) and grant admin consent; check that no application "
                     "access policy or RBAC scope excludes the mailbox.")  # fmt: skip

# Microsoft Graph error codes (reference §5.8), as the error JSON's `error.code`.
GRAPH: dict[str, Explanation] = {
    "ErrorAccessDenied": _e("Graph refused access to the mailbox (ErrorAccessDenied): a missing permission or "
                            "consent, or an application access policy / RBAC scope that excludes it.",
                            _GRAPH_PERMISSION),
    "InvalidAuthenticationToken": _e("Graph refused the access token (InvalidAuthenticationToken): expired, or for "
                                     "the wrong audience.", "Check that the token scope is "
                                     "https://graph.microsoft.com/.default and the Graph endpoint matches the cloud."),
    "MailboxNotEnabledForRESTAPI": _e("The mailbox cannot be used through Graph (MailboxNotEnabledForRESTAPI): it is "
                                      "on-premises, unlicensed, inactive or soft-deleted.",
                                      "Send from a licensed Exchange Online mailbox, or license or migrate this one."),
    "MailboxNotSupportedForRESTAPI": _e("The mailbox cannot be used through Graph (MailboxNotSupportedForRESTAPI).",
                                        "Send from a licensed Exchange Online mailbox."),
    "ErrorInvalidUser": _e("Graph does not know the sending mailbox (ErrorInvalidUser).",
                           "Check graph.mailbox: it must be an Exchange Online mailbox of this directory."),
    "ErrorSendAsDenied": _e("The mailbox may not send as this message's From address (ErrorSendAsDenied).",
                            "An Exchange admin grants the mailbox Send As or Send on Behalf for that address "
                            "(Add-RecipientPermission / GrantSendOnBehalfTo), or the message uses the mailbox's "
                            "own address.", broken=False),
    "ErrorInvalidRecipients": _e("Graph refused the recipients (ErrorInvalidRecipients): one is not a valid "
                                 "address, or there are none.", "Correct the recipients.", broken=False),
    "ErrorTooManyRecipients": _e("The message has more recipients than Exchange Online allows (500).",
                                 "Send it in several messages.", broken=False),
    "ErrorMimeContentInvalidBase64String": _e("Graph could not read the MIME content.",
                                              "Report it: mailgate composed a message Graph refuses.", broken=False),
    "ErrorMessageSizeExceeded": _e("The message is larger than the mailbox may send (ErrorMessageSizeExceeded).",
                                   "Make it smaller, or have an Exchange admin raise MaxSendSize (up to 150 MB).",
                                   broken=False),
    "RequestEntityTooLarge": _e("The request was larger than Graph takes (~4 MB).",
                                "Turn on graph.large_attachments (needs the Mail.ReadWrite permission).",
                                broken=False),
    "ErrorQuotaExceeded": _e("The mailbox is full (ErrorQuotaExceeded).",
                             "Free space in the mailbox (Sent Items counts) or raise its quota."),
    "ApplicationThrottled": _e("Graph throttled the app (ApplicationThrottled).", _RETRY, transient=True),
    "TooManyRequests": _e("Graph throttled the requests (TooManyRequests).", _RETRY, transient=True),
    "ServiceUnavailable": _e("Graph is temporarily unavailable.", _RETRY, transient=True),
}  # fmt: skip


def explain_token_error(error: str | None, codes: list[int] | None = None, status: int | None = None) -> Explanation:
    """What a token endpoint's refusal means: by AADSTS code first, then by OAuth `error`."""
    for code in codes or ():
        if code in AADSTS:
            return AADSTS[code]
    if error and error in OAUTH:
        return OAUTH[error]
    if status is not None and (status == 429 or status >= 500):
        return _e(f"The token endpoint answered HTTP {status}.", _RETRY, transient=True)
    what = f"The token endpoint refused the request ({error or f'HTTP {status}'})."
    return _e(what, "Check the token source settings (token URL, client id, secret, scope).")


def explain_graph_error(status: int, code: str | None) -> Explanation:
    """What a Graph refusal means: by its error code, else by the HTTP status."""
    if code and code in GRAPH:
        return GRAPH[code]
    if status == 429 or status >= 500:
        return _e(f"Graph answered HTTP {status}{f' ({code})' if code else ''}.", _RETRY, transient=True)
    if status == 401:
        return GRAPH["InvalidAuthenticationToken"]
    if status == 403:
        return GRAPH["ErrorAccessDenied"]
    if status == 413:
        return GRAPH["RequestEntityTooLarge"]
    what = f"Graph refused the request (HTTP {status}{f', {code}' if code else ''})."
    return _e(what, "Check the Graph settings; the attempt log has Graph's message.", broken=status in (401, 403, 404))
