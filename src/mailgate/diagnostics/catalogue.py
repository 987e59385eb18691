"""The error catalogue: a failure's cause and the concrete fix, in the admin's words.

One catalogue for everything that reports a failure (the worker's attempt log, the test e-mail,
the API), so the same refusal is explained the same way everywhere. Facts and fixes come from
`shared/reference/mail-providers.md` (§4 Entra, §5.8 Graph, §6 Google), with their sources there.

`broken` says the failure is about the mail server's settings or permissions, not the message:
trying again unchanged cannot help, so the server is marked broken and its messages wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..settings.document import MailServer


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
    65001: _e("Nobody has consented to the permissions this app asks for (AADSTS65001). With a delegated grant: "
              "the consent did not cover them (for Graph: Mail.ReadWrite, needed since graph.large_attachments was "
              "turned on).",
              "Grant consent: for client credentials an admin presses \"Grant admin consent\" under API permissions; "
              "for a delegated grant, connect the mailbox again."),
    70011: _e("The scope is not valid (AADSTS70011): SMTP.SendAsApp asked for delegated, or a malformed resource URL.",
              "Use https://outlook.office365.com/.default (SMTP, app-only), https://outlook.office.com/SMTP.Send "
              "(SMTP, delegated) or https://graph.microsoft.com/.default (Graph, app-only)."),
    1002012: _e("The scope is not valid for a client credentials grant (AADSTS1002012): it must be a resource's "
                "/.default.", "Use https://outlook.office365.com/.default for SMTP or "
                "https://graph.microsoft.com/.default for Graph."),
    70000: _e("The grant is not valid (AADSTS70000, invalid_grant): the refresh token or code was issued to "
              "another app or directory, was revoked, or the consent no longer covers what is asked.",
              _SIGN_IN_AGAIN),
    700082: _e("The refresh token expired because it was not used for a long time (AADSTS700082).", _SIGN_IN_AGAIN),
    70008: _e("The refresh token or authorization code has expired (AADSTS70008).", _SIGN_IN_AGAIN),
    50173: _e("The grant was revoked (AADSTS50173): the user's password changed or an admin revoked the sessions.",
              _SIGN_IN_AGAIN),
    50076: _e("Multi-factor authentication is required (AADSTS50076): a Conditional Access policy now wants it "
              "for this sign-in, and the stored grant does not satisfy it.", _SIGN_IN_AGAIN),
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


# The same refusals when the token is a consenting mailbox's (graph.auth delegated): its
# permissions come from the consent, not from an admin's grant to the app.
GRAPH_DELEGATED: dict[str, Explanation] = {
    "ErrorAccessDenied": _e("Graph refused access to the mailbox (ErrorAccessDenied): the consent did not grant "
                            "the permission this needs (Mail.Send; Mail.ReadWrite for large attachments), or "
                            "an admin withdrew it.",
                            "Add the delegated Microsoft Graph permissions Mail.Send (and Mail.ReadWrite for large "
                            "attachments) to the app registration, then connect the mailbox again."),
    "InvalidAuthenticationToken": _e("Graph refused the mailbox's access token (InvalidAuthenticationToken): "
                                     "expired or revoked, or for another cloud than the Graph endpoint.",
                                     "Connect the mailbox again; check that the Graph endpoint and the authority "
                                     "are of the same cloud."),
}  # fmt: skip


def explain_graph_error(status: int, code: str | None, *, delegated: bool = False) -> Explanation:
    """What a Graph refusal means: by its error code, else by the HTTP status. `delegated`: the
    token was a consenting mailbox's (graph.auth delegated)."""
    if delegated and code is not None and code in GRAPH_DELEGATED:
        return GRAPH_DELEGATED[code]
    if delegated and code not in GRAPH and status in (401, 403):
        return GRAPH_DELEGATED["InvalidAuthenticationToken" if status == 401 else "ErrorAccessDenied"]
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


# ---- Exchange Web Services (on-premises Exchange 2013-2019; reference §9) -----------------------

_EWS_MAILBOX_RIGHTS = ("An Exchange admin gives the account mailbox rights on ews.mailbox (Add-MailboxPermission "
                       "-AccessRights FullAccess, and Send As for a message from another address), or the account "
                       "sends from its own mailbox.")  # fmt: skip

# EWS ResponseCodes (the ResponseMessage's or the SOAP fault's), by code.
EWS: dict[str, Explanation] = {
    "ErrorServerBusy": _e("Exchange is throttling the account (ErrorServerBusy); it said how long to wait "
                          "(BackOffMilliseconds).", _RETRY + " If it persists, an Exchange admin reviews the "
                          "throttling policy (EWSMaxConcurrency, EWSPercentTimeInCAS) of the account.", transient=True),
    "ErrorAccessDenied": _e("Exchange refused access to the mailbox (ErrorAccessDenied): the account may not send "
                            "from or save into ews.mailbox, or EWS is blocked for it.", _EWS_MAILBOX_RIGHTS),
    "ErrorNonExistentMailbox": _e("Exchange has no mailbox with the address in ews.mailbox (ErrorNonExistentMailbox).",
                                  "Set ews.mailbox to the primary SMTP address of a mailbox on this Exchange "
                                  "organization (Get-Mailbox shows it)."),
    "ErrorImpersonateUserDenied": _e("The application may not act as the mailbox (ErrorImpersonateUserDenied): "
                                     "app-only OAuth impersonates ews.mailbox, and the app lacks the right.",
                                     "An Exchange admin grants the app's service principal the "
                                     "ApplicationImpersonation role (New-ManagementRoleAssignment) scoped to the "
                                     "mailbox, or use a password or a delegated token of the mailbox's own user."),
    "ErrorImpersonationDenied": _e("The account may not impersonate the mailbox (ErrorImpersonationDenied).",
                                   "Grant the ApplicationImpersonation role for the mailbox, or send as the mailbox's "
                                   "own user."),
    "ErrorAccountDisabled": _e("The account is disabled (ErrorAccountDisabled).",
                               "Enable the account in Active Directory, or use another account."),
    "ErrorInvalidServerVersion": _e("Exchange does not take requests of the version set in ews.exchange_version "
                                    "(ErrorInvalidServerVersion).", "Set ews.exchange_version to auto, or to the "
                                    "Exchange version the server runs (Exchange2013 … Exchange2019)."),
    "ErrorQuotaExceeded": _e("The mailbox is full (ErrorQuotaExceeded).",
                             "Free space in the mailbox (Sent Items counts), raise its quota, or turn off "
                             "ews.save_to_sent_items."),
    "ErrorSendAsDenied": _e("The account may not send as this message's From address (ErrorSendAsDenied).",
                            "An Exchange admin grants Send As or Send on Behalf for that address "
                            "(Add-ADPermission -ExtendedRights Send-As / GrantSendOnBehalfTo), or the message uses "
                            "the mailbox's own address.", broken=False),
    "ErrorInvalidRecipients": _e("Exchange refused the recipients (ErrorInvalidRecipients): one is not a valid "
                                 "address, or there are none.", "Correct the recipients.", broken=False),
    "ErrorInvalidSmtpAddress": _e("Exchange refused an address as not a valid SMTP address (ErrorInvalidSmtpAddress).",
                                  "Correct the message's addresses.", broken=False),
    "ErrorMessageSizeExceeded": _e("The message is larger than Exchange lets the mailbox send "
                                   "(ErrorMessageSizeExceeded).", "Make it smaller, or have an Exchange admin raise "
                                   "MaxSendSize (Set-Mailbox, Set-TransportConfig) and the EWS request limit.",
                                   broken=False),
    "ErrorMimeContentConversionFailed": _e("Exchange could not convert the message's MIME "
                                           "(ErrorMimeContentConversionFailed).",
                                           "Report it: mailgate composed a message Exchange refuses.", broken=False),
    "ErrorSchemaValidation": _e("Exchange refused the request as not valid EWS (ErrorSchemaValidation).",
                                "Report it, with the Exchange version (the test e-mail shows it).", broken=False),
    "ErrorMailboxStoreUnavailable": _e("The mailbox database is not available (ErrorMailboxStoreUnavailable).",
                                       _RETRY, transient=True),
    "ErrorMailboxMoveInProgress": _e("The mailbox is being moved (ErrorMailboxMoveInProgress).", _RETRY,
                                     transient=True),
    "ErrorInternalServerTransientError": _e("Exchange had a temporary internal error.", _RETRY, transient=True),
    "ErrorTimeoutExpired": _e("Exchange timed out the request (ErrorTimeoutExpired).", _RETRY, transient=True),
    "ErrorExceededConnectionCount": _e("The account has too many connections open to Exchange "
                                       "(ErrorExceededConnectionCount).", _RETRY + " If it persists, lower "
                                       "connection.pool_size.", transient=True),
    "ErrorTooManyObjectsOpened": _e("Exchange has too many objects open for the account (ErrorTooManyObjectsOpened).",
                                    _RETRY, transient=True),
    "autodiscover": _e("Autodiscover found no EWS URL for the mailbox's domain: mailgate asks "
                       "https://<domain>/autodiscover/autodiscover.xml and https://autodiscover.<domain>/…, and "
                       "follows no redirection (it could lead the credentials anywhere).",
                       "Give the EWS URL in ews.url, e.g. https://mail.example.com/EWS/Exchange.asmx "
                       "(Get-WebServicesVirtualDirectory shows its ExternalUrl), or publish Autodiscover there."),
}  # fmt: skip

_EWS_401 = {
    "ntlm": ("Exchange refused the user name and password (HTTP 401, NTLM).",
             "Check auth.username (DOMAIN\\user or user@domain) and auth.password; check that the EWS virtual "
             "directory offers Windows (NTLM) authentication; with Extended Protection on, mailgate binds NTLM to the "
             "TLS certificate, so a TLS-terminating proxy in front of Exchange breaks it."),
    "basic": ("Exchange refused the user name and password (HTTP 401, Basic).",
              "Check auth.username and auth.password, and that Basic authentication is on for the EWS virtual "
              "directory (Set-WebServicesVirtualDirectory -BasicAuthentication $true); or use ntlm."),
    "bearer": ("Exchange refused the OAuth access token (HTTP 401): expired, for another audience, or OAuth is not "
               "set up for on-premises EWS.", "On-premises EWS takes Entra ID tokens only with hybrid modern "
               "authentication; check the token scope (https://outlook.office365.com/.default app-only, "
               ".../EWS.AccessAsUser.All delegated) or use a password."),
}  # fmt: skip


def explain_ews_error(status: int, code: str | None, *, scheme: str = "ntlm") -> Explanation:
    """What an EWS refusal means: by its ResponseCode, else by the HTTP status."""
    if code and code in EWS:
        return EWS[code]
    if status == 401:
        cause, fix = _EWS_401.get(scheme, _EWS_401["ntlm"])
        return _e(cause, fix)
    if status == 403:
        return _e(
            "Exchange refused EWS to this account or application (HTTP 403).",
            "An Exchange admin allows EWS for the mailbox (Set-CASMailbox -EwsEnabled $true) and checks the "
            "organization's EWS application access policy (EwsApplicationAccessPolicy, EwsAllowList).",
        )
    if status == 404:
        return _e(
            "There is no EWS at ews.url (HTTP 404).",
            "Use the EWS URL of the server, e.g. https://mail.example.com/EWS/Exchange.asmx.",
        )
    if status in (429, 502, 503, 504) or (status >= 500 and not code):
        return _e(f"Exchange answered HTTP {status}{f' ({code})' if code else ''}.", _RETRY, transient=True)
    if status == 200 and not code:
        return _e(
            "ews.url answered, but not as EWS does (no SOAP response message).",
            "Check ews.url: it must be the server's EWS endpoint (…/EWS/Exchange.asmx), not a sign-in page.",
        )
    if status == 200:  # a response message about this message
        what = f"Exchange refused the message ({code})."
        return _e(what, "Read Exchange's message in the attempt log.", broken=False)
    if status >= 500:  # a SOAP fault: about the request's settings (version, impersonation, …), not the message
        return _e(
            f"Exchange refused the request ({code}).",
            "Read Exchange's message in the attempt log and check "
            "the ews settings (url, exchange_version, mailbox) and the account's rights.",
        )
    return _e(
        f"Exchange answered HTTP {status} to the EWS request.",
        "Check ews.url: it must be the server's EWS endpoint (…/EWS/Exchange.asmx).",
    )


# ---- SMTP (reference §3 Exchange Online, §6 Gmail, §7 RFC 5321) -------------------------------

_CHECK_PASSWORD = ("Check the user name and password in the mail server settings (a mailbox with multi-factor "
                   "sign-in needs an app password, or OAuth2).")  # fmt: skip

# By enhanced status code; a reply's text may refine it (_SMTP_TEXT).
SMTP: dict[str, Explanation] = {
    "5.7.139": _e("The mail server turned SMTP AUTH off for this mailbox or the whole organization (535 5.7.139). "
                  "This is not a password or token problem: signing in again cannot help.",
                  "An Exchange admin enables authenticated SMTP for the mailbox (Set-CASMailbox <mailbox> "
                  "-SmtpClientAuthenticationDisabled $false, or in the Microsoft 365 admin center → the user → Mail → "
                  "Authenticated SMTP), or use Microsoft Graph (kind graph) instead."),
    "5.7.3": _e("The server refused the credentials (535 5.7.3): a wrong password or token, a token for the wrong "
                "audience or scope, or a user name that is not the mailbox.",
                "Check auth.username (the mailbox address) and the password or token source. For an app-only token "
                "(client credentials), an Exchange admin must also register the app's service principal in Exchange "
                "(New-ServicePrincipal with the Enterprise application's object id) and grant it FullAccess to the "
                "mailbox (Add-MailboxPermission)."),
    "5.7.8": _e("The server refused the user name and password (535 5.7.8).", _CHECK_PASSWORD),
    "5.7.30": _e("The server no longer accepts passwords for SMTP (550 5.7.30: Basic authentication is off).",
                 "Switch auth to oauth2 (XOAUTH2 with a Microsoft token source) or use Microsoft Graph."),
    "5.7.4": _e("The server does not accept this authentication mechanism (504 5.7.4): it wants another one — "
                "Exchange Online and Gmail want XOAUTH2 once passwords are off.",
                "Set auth.mechanism to auto, or use the method the server offers (oauth2 for XOAUTH2)."),
    "5.7.57": _e("The server refused to take mail without authentication (5.7.57): AUTH did not happen before MAIL "
                 "FROM.", "Set auth (password or oauth2) and security starttls-required, so AUTH is offered and used."),
    "5.7.60": _e("The signed-in mailbox may not send as this From address (5.7.60).",
                 "Use the mailbox's own address as from_address, or have an Exchange admin grant Send As "
                 "(Add-RecipientPermission <from> -AccessRights SendAs -Trustee <mailbox>).", broken=False),
    "5.2.252": _e("The signed-in mailbox may not send as this From address (554 5.2.252 SendAsDenied).",
                  "Use the mailbox's own address as from_address, or grant Send As; new permissions can take an "
                  "hour to apply.", broken=False),
    "4.7.66": _e("The server refuses TLS 1.0 and 1.1 (421 4.7.66).", "Nothing to change in mailgate (it uses TLS 1.2 "
                 "or newer); a TLS-intercepting proxy between here and the server may be downgrading it."),
    "4.3.2": _e("The mailbox has too many SMTP connections at once (432 4.3.2; Exchange Online allows 3).",
                "Set quota.max_concurrent_connections to 3 (or fewer) for this server.", transient=True),
    "4.5.3": _e("Too many recipients in one transaction (452 4.5.3).",
                "Nothing to change: mailgate sends the rest in another transaction.", transient=True),
    "5.2.2": _e("The mailbox's sending quota is used up (5.2.2: submission quota exceeded; Exchange Online: 10,000 "
                "recipients a day, 30 messages a minute), or the mailbox is full.",
                "Set quota.recipients_per_day and quota.messages_per_minute to the provider's limits, send from "
                "more mailboxes, or use a bulk service; a full mailbox needs its Sent Items cleared.", broken=False),
    "5.1.8": _e("The provider blocked this account from sending (550 5.1.8 bad outbound sender), usually after spam "
                "from a compromised account.", "Secure the account, then a Microsoft 365 admin releases it under "
                "Restricted users in Microsoft Defender (https://security.microsoft.com/restrictedusers)."),
    "5.7.705": _e("Microsoft blocked this tenant's outbound mail (550 5.7.705): it sent too much spam.",
                  "Fix the compromised accounts, then ask Microsoft Support to lift the block."),
    "5.7.708": _e("Microsoft does not accept mail from this sending IP (550 5.7.708), typical for new or trial "
                  "tenants.", "A Microsoft 365 admin asks Support for an exception."),
    "5.7.750": _e("Microsoft refuses mail from an unregistered domain (550 5.7.750).",
                  "Add and verify the sender's domain as an accepted domain in Microsoft 365."),
    "5.7.512": _e("The server refused the message's From header (550 5.7.512).",
                  "Check from_address: it must be a valid address.", broken=False),
    "5.6.11": _e("The server refused bare line feeds in the message (550 5.6.11).",
                 "Report it: mailgate sends CRLF line ends.", broken=False),
    "5.1.90": _e("The mailbox reached its daily recipient limit (5.1.90; Exchange Online: 10,000 recipients in 24 "
                 "hours).", "Set quota.recipients_per_day to the provider's limit so mailgate paces itself, or send "
                 "from more mailboxes.", broken=False),
    "5.7.703": _e("The recipient or its domain is on the tenant's block list (550 5.7.703).",
                  "A Microsoft 365 admin edits the Tenant Allow/Block List.", broken=False),
    "4.7.500": _e("Microsoft restricts this sender for a while after suspicious activity (451 4.7.500-699).", _RETRY,
                  transient=True),
    "5.7.501": _e("Microsoft banned this sending account for spam (550 5.7.501-503).",
                  "Secure the account, then ask Microsoft Support to lift the ban."),
    "5.7.606": _e("The sending IP address is on Microsoft's block list (550 5.7.606-649).",
                  "Request delisting at https://sender.office.com/."),
    "5.7.1": _e("The server refused to relay (5.7.1): it does not take mail from this client, sender or for this "
                "recipient without authentication.", "Set auth for this server, or have its admin allow this "
                "machine's address to relay."),
    "5.1.1": _e("The recipient's address does not exist (5.1.1).", "Correct the recipient.", broken=False),
}  # fmt: skip


# What the SMTP session itself ran into, found by what mailgate saw rather than by an enhanced
# code; tests/test_catalogue.py provokes each one against a real server.
SESSION: dict[str, Explanation] = {
    "helo": _e("The server refused the name mailgate greeted it with (EHLO): it wants the fully qualified host "
               "name of the machine mailgate runs on (Postfix's reject_non_fqdn_helo_hostname answers "
               "\"504 5.5.2 … Helo command rejected: need fully-qualified hostname\", at RCPT TO).",
               "Set smtp.helo_name to this machine's fully qualified host name (e.g. mailer.example.com, one "
               "that resolves in DNS if the server checks that), or have the server's administrator accept "
               "this client."),
    "implicit_tls": _e("This port speaks implicit TLS (like 465): the server sends no SMTP greeting until a TLS "
                       "handshake, so STARTTLS (or a session in clear) can't start on it.",
                       "Set smtp.security to tls for this port (usually 465), or use the server's STARTTLS port "
                       "(587) with security starttls-required."),
    "not_smtp": _e("Something that is not an SMTP server answers at this host and port: its first line was not "
                   "an SMTP reply (a web server, a database or another service listens there).",
                   "Check smtp.host and smtp.port: the mail server's submission port is usually 587 (security "
                   "starttls-required) or 465 (security tls), a relay's 25."),
}  # fmt: skip


def explain_smtp_reply(code: int | None, enhanced: str | None, text: str = "", *, app_only: bool = False,
                       mechanism: str | None = None) -> Explanation:  # fmt: skip
    """What an SMTP refusal means, by its enhanced code (and, for a few, its text)."""
    lowered = text.lower()
    if "helo command rejected" in lowered or "need fully-qualified hostname" in lowered:
        # Before the codes: 504 would read as "mechanism not supported" (5.7.4) below.
        helo = SESSION["helo"]
        temporary = code is not None and 400 <= code < 500  # e.g. "450 4.7.1 … Host not found"
        return _e(helo.cause, helo.fix, transient=True) if temporary else helo
    if enhanced == "5.7.139" and "security defaults" in lowered:
        return _e(
            "Security defaults block this sign-in (535 5.7.139).",
            "Use oauth2 (XOAUTH2) instead of a password, or have an Entra ID admin review security defaults.",
        )
    if enhanced == "5.7.139" and "did not meet the criteria" in lowered:
        return _e(
            "A sign-in policy (Conditional Access, or a multi-factor requirement) blocks this sign-in (535 5.7.139).",
            "Use oauth2 (XOAUTH2); an Entra ID admin reviews the sign-in logs and policies.",
        )
    if "sendasdenied" in lowered:
        return SMTP["5.2.252"]
    if enhanced == "5.7.8" and mechanism == "XOAUTH2":
        return _e(
            "The server refused the access token (535 5.7.8): expired, revoked, for another scope, or the "
            "user name is not the mailbox it was issued for.",
            "Check auth.username (the mailbox) and the token source's scope (Gmail: https://mail.google.com/); "
            "connect the mailbox again if its grant was revoked.",
        )
    ranged = _ranged(enhanced)
    if ranged is not None:
        return SMTP[ranged]
    if enhanced == "5.7.3" and mechanism == "XOAUTH2" and app_only:
        return _e(
            "Exchange refused the app-only token (535 5.7.3). The most common cause: the app's service "
            "principal is not registered in Exchange Online, or it has no permission on this mailbox.",
            "An Exchange admin runs New-ServicePrincipal -AppId <client id> -ObjectId <the Enterprise "
            "application's object id> and Add-MailboxPermission -Identity <mailbox> -User <that object id> "
            "-AccessRights FullAccess; check also that the token scope is "
            "https://outlook.office365.com/.default and auth.username is the mailbox.",
        )
    if enhanced in SMTP:
        return SMTP[enhanced]
    if code == 504 or (enhanced or "").startswith("5.5.4"):
        return SMTP["5.7.4"]
    if code == 535 or code == 534:
        return _e(f"The server refused the credentials ({_said(code, enhanced)}).", _CHECK_PASSWORD)
    if code is not None and 400 <= code < 500:
        return _e(
            f"The server answered {_said(code, enhanced)}: a temporary refusal.",
            _RETRY,
            transient=True,
        )
    return _e(
        f"The server refused ({_said(code, enhanced)}).",
        "Read the server's reply in the details; its administrator can say more.",
        broken=False,
    )


def _said(code: int | None, enhanced: str | None) -> str:
    return " ".join(str(x) for x in (code, enhanced) if x)


def _ranged(enhanced: str | None) -> str | None:
    """The catalogue key of an enhanced code that belongs to one of Exchange's ranges."""
    parts = (enhanced or "").split(".")
    if len(parts) != 3 or parts[1] != "7" or not parts[2].isdigit():
        return None
    cls, detail = parts[0], int(parts[2])
    if cls == "4" and 500 <= detail <= 699:
        return "4.7.500"
    if cls == "5" and 501 <= detail <= 503:
        return "5.7.501"
    if cls == "5" and 606 <= detail <= 649:
        return "5.7.606"
    return None


def explain_smtp_error(e: BaseException, *, host: str = "", port: int = 0, security: str = "",
                       app_only: bool = False) -> Explanation:  # fmt: skip
    """What a failed SMTP session means: DNS, connection, timeout, TLS, security, AUTH, replies."""
    from ..smtp.errors import (
        SMTPAuthError,
        SMTPConnectError,
        SMTPProtocolError,
        SMTPSecurityError,
        SMTPTimeoutError,
        SMTPTLSError,
    )

    text = str(e)
    lowered = text.lower()
    where = f"{host}:{port}" if host else "the mail server"
    if isinstance(e, SMTPConnectError) and "cannot resolve" in lowered:
        return _e(
            f"The mail server's name {host!r} does not resolve (DNS).",
            "Check smtp.host for a typo (Exchange Online: smtp.office365.com; Gmail: smtp.gmail.com); this "
            "machine's DNS must find it.",
        )
    if isinstance(e, SMTPConnectError) and getattr(e, "code", None) is None:
        return _e(
            f"Nothing accepted the connection at {where} ({text.split(': ', 1)[-1]}).",
            "Check smtp.host and smtp.port (587 with starttls, 465 with tls, 25 for a relay), that the server "
            "runs, and that no firewall blocks this machine.",
        )
    if isinstance(e, SMTPProtocolError) and "did not answer as an smtp server" in lowered:
        return SESSION["not_smtp"]
    if isinstance(e, SMTPTimeoutError):
        if "connecting" in lowered:
            return _e(
                f"{where} did not answer the connection in time: a firewall drops the packets, or the "
                "host or port is wrong (many networks block outgoing port 25).",
                "Check smtp.host and smtp.port, and that this machine may connect out to that port.",
                transient=True,
            )
        return _e(f"{where} stopped answering ({text}).", _RETRY, transient=True)
    if isinstance(e, SMTPTLSError):
        if "expired" in lowered:
            return _e(
                f"The certificate of {where} has expired.",
                "The server's administrator renews its certificate. (Turning verify_certificate off would "
                "send the password to whoever answers.)",
            )
        if "mismatch" in lowered or "doesn't match" in lowered or "not valid for" in lowered:
            return _e(
                f"The certificate of {where} is for another host name.",
                "Use the host name the certificate names in smtp.host (e.g. smtp.office365.com, not an IP "
                "address or an alias).",
            )
        if "self-signed" in lowered or "self signed" in lowered or "local issuer" in lowered:
            return _e(
                f"The certificate of {where} is not signed by a trusted authority (self-signed or a private CA).",
                "Give the CA's certificate in smtp.ca_certificate (the global server may name a file on "
                "mailgate's machine in smtp.ca_file instead), or have the server use a public certificate.",
            )
        if "wrong_version_number" in lowered or "wrong version number" in lowered:
            return _e(
                f"{where} does not speak TLS from the start: it is a plain SMTP port.",
                "Use security starttls-required with this port (usually 587), or port 465 for security tls.",
            )
        if "protocol_version" in lowered or "unsupported_protocol" in lowered or "no protocols" in lowered:
            return _e(
                f"{where} offers only TLS versions older than 1.2, which mailgate refuses.",
                "The server's administrator enables TLS 1.2 or 1.3.",
            )
        if "during the handshake" in lowered:
            return _e(
                f"{where} hung up during the TLS handshake: it offers no TLS version (mailgate needs TLS 1.2 or "
                "newer) or cipher that mailgate accepts, or something between here and there cut it.",
                "The server's administrator enables TLS 1.2 or 1.3; check smtp.port and smtp.security.",
            )
        return _e(
            f"TLS with {where} failed ({text}).",
            "Check smtp.security and smtp.port, and the CA certificate (smtp.ca_certificate or ca_file).",
        )
    if isinstance(e, SMTPSecurityError):
        if "speaks implicit tls" in lowered:
            return SESSION["implicit_tls"]
        if "does not offer starttls" in lowered or "did not offer starttls" in lowered:
            return _e(
                f"{where} does not offer STARTTLS, and mailgate will not send credentials or mail unencrypted "
                f"(security {security or 'starttls-required'}).",
                "Use the server's TLS port (587 with starttls-required, 465 with tls); only for a relay on a "
                "trusted network, set security none.",
            )
        return _e(text, "Check smtp.security.")
    if isinstance(e, SMTPAuthError):
        if e.code is None and e.mechanism is None:
            return _e(
                f"{where} offers no authentication mechanism mailgate may use here ({text}).",
                "Use the method the server offers: oauth2 when it offers XOAUTH2 only (Exchange Online, "
                "Gmail); a password needs PLAIN, LOGIN or CRAM-MD5 over TLS.",
            )
        explained = explain_smtp_reply(e.code, e.enhanced, e.reply or "", app_only=app_only, mechanism=e.mechanism)
        if e.tries:  # mechanism auto tried each in turn, and each was refused
            return _every_mechanism_refused(e.tries, explained)
        return explained
    code, enhanced = getattr(e, "code", None), getattr(e, "enhanced", None)
    if code is not None:
        return explain_smtp_reply(code, enhanced, getattr(e, "reply", None) or "", app_only=app_only)
    return _e(text or type(e).__name__, "Read the details; the protocol log shows the conversation.")


def _every_mechanism_refused(tries: Sequence[object], last: Explanation) -> Explanation:
    """Mechanism auto tried each password mechanism both sides have, and the server refused every
    one: the user name or password is wrong (or the account locked), not the mechanism."""
    from ..errors import foreign_text

    listed = "; ".join(foreign_text(str(t), 200) for t in tries)
    return _e(
        f"The server refused the password with every mechanism both sides have ({listed}), so the mechanism is "
        f"not the problem. The last reply: {last.cause}",
        last.fix + " Each refused try counts as a failed sign-in: an account that locks after a few (Active "
        "Directory) may be locked now.",
        transient=last.transient,
        broken=last.broken,
    )


def granted_permissions(claims: dict[str, Any]) -> list[str]:
    """What a Graph access token grants: its `roles` (app-only) and `scp` (delegated)."""
    roles = claims.get("roles") or []
    return sorted(set(roles if isinstance(roles, list) else []) | set(str(claims.get("scp") or "").split()))


def permission_problem(
    claims: dict[str, Any], *, large_attachments: bool, delegated: bool = False
) -> Explanation | None:
    """What a Graph access token lacks for sending; None when nothing (or an opaque token).
    `delegated`: the token is a consenting mailbox's, whose permissions come from the consent."""
    if not claims:
        return None  # an opaque token: nothing to check before sending
    granted = granted_permissions(claims)
    missing = [p for p in needed_permissions(large_attachments) if p not in granted]
    if missing and delegated:
        what = " and ".join(missing)
        return _e(f"The mailbox's access token does not grant {what} (it has: {', '.join(granted) or 'nothing'}).",
                  f"Add the delegated Microsoft Graph permission {what} to the app registration (API permissions), "
                  "then connect the mailbox again: the consent asks for it.")  # fmt: skip
    if missing:
        what = " and ".join(missing)
        return _e(f"The access token does not grant {what} (it has: {', '.join(granted) or 'nothing'}).",
                  f"In Entra ID → App registrations → the app → API permissions, add the Microsoft Graph application "
                  f"permission {what} and press \"Grant admin consent\"; tokens carry it a few minutes later."
                  + (" Mail.ReadWrite is needed because graph.large_attachments is on." if "Mail.ReadWrite" in missing
                     else ""))  # fmt: skip
    return None


def needed_permissions(large_attachments: bool) -> list[str]:
    return ["Mail.Send"] + (["Mail.ReadWrite"] if large_attachments else [])


# ---- one entry point for whatever failed -------------------------------------------------------


def explain_failure(failure: object, server: MailServer) -> Explanation | None:
    """The cause and fix of a failure with `server`, in the same words wherever it shows (the test
    e-mail, the worker's attempt log, a broken server's reason): an exception (token endpoint and
    Graph errors carry their own explanation), an SMTP reply, or a Delivery's first refusal. None
    when nothing is known about it."""
    from ..delivery import Delivery, Outcome
    from ..settings.document import OAuth2AuthSettings

    auth = server.auth
    app_only = isinstance(auth, OAuth2AuthSettings) and auth.token.grant == "client_credentials"
    if isinstance(failure, Delivery):
        refused = [r for r in failure.results if r.outcome is not Outcome.ACCEPTED and r.code is not None]
        if not refused or server.kind != "smtp":
            return None
        return explain_smtp_reply(refused[0].code, refused[0].enhanced, refused[0].text or "", app_only=app_only)
    known = getattr(failure, "explanation", None)
    if isinstance(known, Explanation):
        return known
    if server.kind != "smtp" or server.smtp is None:
        return None
    if isinstance(failure, BaseException):
        from ..errors import DeliveryError, InvalidInput

        if not isinstance(failure, DeliveryError | InvalidInput):
            return None  # cancelled, or a bug: nothing the admin could change
        s = server.smtp
        return explain_smtp_error(failure, host=s.host, port=s.effective_port, security=s.security, app_only=app_only)
    code = getattr(failure, "code", None)  # an SMTP reply
    return explain_smtp_reply(code, getattr(failure, "enhanced", None), getattr(failure, "text", ""), app_only=app_only)


def with_explanation(text: str, explanation: Explanation | None) -> str:
    """`text`, followed by the explanation unless it says it already."""
    if explanation is None or explanation.cause in text:
        return text
    return f"{text} — {explanation}"
