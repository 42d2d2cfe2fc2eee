"""Usage over time for the admin API: the window a query asks for, checked, and the pages of buckets that answer it
(one tenant's, or every tenant's for a billing export).

Buckets are aligned to UTC hours or days, as OpenAI's usage API aligns them: ``start_time`` is rounded down to the
start of its bucket and ``end_time`` (exclusive; default now) up to the end of its own, and every bucket between is
answered, empty or not. A page holds at most ``limit`` buckets; the cross-tenant view also holds at most
``max_rows`` (tenant, bucket) pairs, so a page stays bounded however many tenants there are. A page's reads are a
constant number of round trips: one for a tenant's buckets; two for every tenant's (the tenants of each bucket,
then their buckets).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from gateway.admin.protocol import TenantUsageResultOut, UsageBucketOut, UsagePage, UsageQuery, UsageResultOut
from gateway.errors import InvalidRequest
from gateway.usage import WIDTH_S, BucketWidth, Usage, UsageRow, bucket_start

MAX_BUCKETS: dict[BucketWidth, int] = {"1h": 168, "1d": 31}
DEFAULT_BUCKETS: dict[BucketWidth, int] = {"1h": 24, "1d": 7}


@dataclass(frozen=True, slots=True)
class Window:
    """One page of a usage query: its buckets' starts, and where the next page starts (None: the last page)."""

    width: BucketWidth
    starts: list[int]
    stop: int
    """The end of the query's last bucket (exclusive)."""
    after_tenant: str | None = None
    """Cross-tenant pages: in the first bucket, the tenants after this one (where the previous page stopped)."""

    @property
    def next_start(self) -> int | None:
        following = self.starts[-1] + WIDTH_S[self.width]
        return following if following < self.stop else None


def window(query: UsageQuery, *, now: float, tenant_cursor: bool = False) -> Window:
    """The page ``query`` asks for (:class:`InvalidRequest` naming the parameter otherwise). ``tenant_cursor``: the
    cross-tenant view, whose ``page`` may also name the tenant to go on after."""
    width = query.bucket_width
    if width is None:
        raise InvalidRequest("bucket_width (1h or 1d) is required with start_time, end_time, limit or page.",
                             param="bucket_width")
    if query.start_time is None:
        raise InvalidRequest("start_time (unix seconds) is required with bucket_width.", param="start_time")
    end = query.end_time if query.end_time is not None else int(now)
    if end <= query.start_time:
        raise InvalidRequest("end_time must be after start_time.", param="end_time")
    size = WIDTH_S[width]
    first, stop = bucket_start(query.start_time, width), -(-end // size) * size
    limit = query.limit if query.limit is not None else DEFAULT_BUCKETS[width]
    if limit > MAX_BUCKETS[width]:
        raise InvalidRequest(f"limit is at most {MAX_BUCKETS[width]} buckets of {width}.", param="limit")
    begin, after_tenant = first, None
    if query.page is not None:
        begin, after_tenant = _parse_page(query.page, tenant_cursor=tenant_cursor)
        if begin % size or not first <= begin < stop:
            raise InvalidRequest("page is not a page of this query.", param="page")
    return Window(width=width, starts=list(range(begin, min(stop, begin + limit * size), size)), stop=stop,
                  after_tenant=after_tenant)


def _parse_page(page: str, *, tenant_cursor: bool) -> tuple[int, str | None]:
    start, dot, tenant = page.partition(".")
    if not start.isdigit() or (dot and (not tenant_cursor or not tenant)):
        raise InvalidRequest("page is not a page of this query.", param="page")
    return int(start), tenant or None


async def tenant_page(usage: Usage, tenant: str, query: Window) -> UsagePage[UsageResultOut]:
    buckets = await usage.buckets(tenant, width=query.width, starts=query.starts)
    data = [UsageBucketOut[UsageResultOut](start_time=b.start_time, end_time=b.end_time,
                                           results=[_result(row) for row in b.rows]) for b in buckets]
    following = query.next_start
    return UsagePage[UsageResultOut](data=data, has_more=following is not None,
                                     next_page=str(following) if following is not None else None)


async def all_tenants_page(usage: Usage, query: Window, *, max_rows: int) -> UsagePage[TenantUsageResultOut]:
    """Every tenant's usage in the window's buckets, by bucket then tenant, at most ``max_rows`` (tenant, bucket)
    pairs: a bucket whose tenants do not all fit goes on on the next page (``next_page`` names the last tenant)."""
    tenants = await usage.tenants_in(width=query.width, starts=query.starts)
    pairs = [(tenant, start) for start, names in zip(query.starts, tenants, strict=True) for tenant in names
             if not (start == query.starts[0] and query.after_tenant is not None and tenant <= query.after_tenant)]
    page, more = pairs[:max_rows], len(pairs) > max_rows
    rows = await usage.tenant_buckets(page, width=query.width) if page else []
    by_start = {start: list(itertools.chain.from_iterable(r for (_, s), r in zip(page, rows, strict=True)
                                                          if s == start)) for start in query.starts}
    last_start = page[-1][1] if more else query.starts[-1]
    data = [UsageBucketOut[TenantUsageResultOut](
        start_time=start, end_time=start + WIDTH_S[query.width],
        results=[TenantUsageResultOut(tenant=row.tenant or "", **_result(row).model_dump()) for row in by_start[start]])
        for start in query.starts if start <= last_start]
    if more:
        tenant, start = page[-1]
        return UsagePage[TenantUsageResultOut](data=data, has_more=True, next_page=f"{start}.{tenant}")
    following = query.next_start
    return UsagePage[TenantUsageResultOut](data=data, has_more=following is not None,
                                           next_page=str(following) if following is not None else None)


def _result(row: UsageRow) -> UsageResultOut:
    return UsageResultOut(model=row.model, user=row.user, requests=row.counts.requests,
                          prompt_tokens=row.counts.prompt_tokens, completion_tokens=row.counts.completion_tokens)
