"""Security review: IPv6 forms of the operator's addresses that the destination policy let pass."""

from __future__ import annotations

import pytest

from mailgate.destinations import DestinationRefused, Destinations


@pytest.mark.parametrize(
    "host",
    [
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254 (cloud metadata)
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "fec0::1",  # site-local (deprecated, still routed inside some networks)
    ],
)
async def test_ipv6_forms_of_internal_addresses_are_refused(host: str) -> None:
    with pytest.raises(DestinationRefused):
        await Destinations().tenant.resolve(host, 443)


async def test_6to4_of_a_public_address_is_still_allowed() -> None:
    assert await Destinations().tenant.resolve("2002:808:808::1", 443) == ["2002:808:808::1"]
