from tests.nodes.test_payment_server import *
async def test_probe(dep):
    chip = dep.load_cert(f"{DEV}.chip")
    blobs = [make_order(dep, f"o-{i}", amount=1_000, counter=i) for i in range(1, 6)]
    a = make_node(PaymentServer, dep, PS, FakeBroker(), SETTINGS, deployment=dep)
    b = make_node(PaymentServer, dep, PS, FakeBroker(), SETTINGS, deployment=dep)
    async with running(a), running(b):
        for blob in blobs:
            await a.ledger.store_grant(DEV, hash_of(blob), make_verdict(dep, DEV, hash_of(blob)), now_ms() + 60_000)
        answers = await asyncio.gather(*(s.settle(blob, chip) for blob in blobs for s in (a, b)))
    print([peek(r) for r in answers], a.counters, b.counters)
    blobs = [make_order(dep, f"x-{i}", amount=9_000, counter=i) for i in range(1, 21)]
    async with platform(dep) as p:
        await asyncio.gather(*(p.grant(blob) for blob in blobs))
        answers = await asyncio.gather(*(p.pay(blob) for blob in blobs))
    print([(r.order_id, r.code) for r, _ in answers])
def peek(raw):
    from protocol.records import peek_record
    r = peek_record(Receipt, raw, "r"); return (r.order_id, r.status, r.code)
