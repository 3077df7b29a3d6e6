//! The conformance cases, written once over `Arc<dyn Backend>` and run on every backend.
//! A case that needs a capability the backend lacks returns [`Skip`](super::Skip) (and checks
//! that asking for it anyway fails with `Unsupported` where that applies).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, ensure};
use ferry_backends::{
    BackendError, BackendMessage, Backoff, BoxError, Delivery, Job, Permanent, Priority, Queue,
    QueueSubscription, Start, Stats, SubscribeOptions, Support, DLQ_REASON_HEADER,
};
use tokio::time::Instant;

use super::{collect_acked, expect_none, msg, num, recv, Ctx, Skip};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

/// Publish, subscribe: ids, payloads, headers, keys, topic and attempt survive the trip, in
/// order; nothing more arrives after the acks.
pub async fn publish_subscribe(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut sub = b.subscribe(SubscribeOptions::new(&topic)).await?;
    let mut sent = Vec::new();
    for i in 0..10 {
        let m = msg(i).with_key(format!("k{}", i % 3));
        let ack = b.publish(&topic, m.clone()).await?;
        ensure!(ack.id == m.id, "publish ack id {} != {}", ack.id, m.id);
        sent.push(m);
    }
    for m in &sent {
        let d = recv(&mut sub, WAIT).await?;
        ensure!(d.topic() == topic, "topic {} != {topic}", d.topic());
        ensure!(
            d.attempt() == 1,
            "first delivery has attempt {}",
            d.attempt()
        );
        ensure!(
            d.id == m.id,
            "id {} != {} (out of order or lost)",
            d.id,
            m.id
        );
        ensure!(d.payload == m.payload, "payload differs");
        ensure!(d.key == m.key, "key {:?} != {:?}", d.key, m.key);
        ensure!(
            d.headers == m.headers,
            "headers {:?} != {:?}",
            d.headers,
            m.headers
        );
        d.ack().await?;
    }
    expect_none(&mut sub, QUIET).await
}

/// `publish_batch`: acknowledged in order with the messages' ids, delivered in order.
pub async fn publish_batch(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut sub = b.subscribe(SubscribeOptions::new(&topic)).await?;
    let batch: Vec<BackendMessage> = (0..25).map(msg).collect();
    let acks = b.publish_batch(&topic, batch.clone()).await?;
    ensure!(
        acks.len() == batch.len(),
        "{} acks for {} messages",
        acks.len(),
        batch.len()
    );
    for (a, m) in acks.iter().zip(&batch) {
        ensure!(a.id == m.id, "ack ids out of order");
    }
    let got = collect_acked(&mut sub, batch.len(), WAIT).await?;
    let got: Vec<usize> = got.iter().map(num).collect::<anyhow::Result<_>>()?;
    ensure!(
        got == (0..25).collect::<Vec<_>>(),
        "batch delivered as {got:?}"
    );
    Ok(())
}

/// Two independent subscriptions each receive every message.
pub async fn fanout(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("fanout", ctx.caps.fanout)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut s1 = b.subscribe(SubscribeOptions::new(&topic)).await?;
    let mut s2 = b.subscribe(SubscribeOptions::new(&topic)).await?;
    for i in 0..20 {
        b.publish(&topic, msg(i)).await?;
    }
    for s in [&mut s1, &mut s2] {
        let got = collect_acked(s, 20, WAIT).await?;
        let set: BTreeSet<usize> = got.iter().map(num).collect::<anyhow::Result<_>>()?;
        ensure!(
            set.len() == 20,
            "a subscriber got {} distinct of 20",
            set.len()
        );
        expect_none(s, QUIET).await?;
    }
    Ok(())
}

/// Members of a group share the messages (each to exactly one); another group gets them all.
pub async fn consumer_groups(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("consumer groups", ctx.caps.groups)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let g1 = ctx.name("g1");
    let opts = SubscribeOptions::new(&topic)
        .group(&g1)
        .ack_timeout(Duration::from_secs(20))
        .prefetch(4);
    let mut m1 = b.subscribe(opts.clone()).await?;
    let mut m2 = b.subscribe(opts).await?;
    let mut other = b
        .subscribe(SubscribeOptions::new(&topic).group(ctx.name("g2")))
        .await?;
    let n = 40;
    for i in 0..n {
        b.publish(&topic, msg(i)).await?;
    }
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    let mut per_member = [0usize; 2];
    let deadline = Instant::now() + WAIT * 2;
    while seen.len() < n {
        ensure!(Instant::now() < deadline, "group got {} of {n}", seen.len());
        let (d, who) = tokio::select! {
            d = m1.next() => (d?, 0),
            d = m2.next() => (d?, 1),
            () = tokio::time::sleep_until(deadline) => continue,
        };
        per_member[who] += 1;
        *seen.entry(num(&d)?).or_default() += 1;
        d.ack().await?;
    }
    ensure!(
        seen.values().all(|c| *c == 1),
        "some messages went to more than one member: {seen:?}"
    );
    expect_none(&mut m1, QUIET).await?;
    expect_none(&mut m2, Duration::from_millis(100)).await?;
    let all = collect_acked(&mut other, n, WAIT).await?;
    let set: BTreeSet<usize> = all.iter().map(num).collect::<anyhow::Result<_>>()?;
    ensure!(
        set.len() == n,
        "the second group got {} distinct of {n}",
        set.len()
    );
    eprintln!("  group split: {per_member:?}");
    Ok(())
}

/// Messages of each key arrive in publish order (one subscriber, keys interleaved).
pub async fn ordering_per_key(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("ordering", ctx.caps.ordering)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut sub = b
        .subscribe(SubscribeOptions::new(&topic).group(ctx.name("ordered")))
        .await?;
    let keys = ["a", "b", "c"];
    let n = 60;
    for i in 0..n {
        let key = keys[i % keys.len()];
        b.publish(&topic, msg(i).with_key(key)).await?;
    }
    let got = collect_acked(&mut sub, n, WAIT).await?;
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    for m in &got {
        let key = m.key.clone().ok_or_else(|| anyhow!("key lost"))?;
        let i = num(m)?;
        if let Some(prev) = last.insert(key.clone(), i) {
            ensure!(prev < i, "key {key}: {i} arrived after {prev}");
        }
    }
    Ok(())
}

/// A nack redelivers (attempt 2), on a fanout subscription and in a group.
pub async fn nack_redelivers(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let b = &ctx.backend;
    for (i, group) in [None, Some(ctx.name("nack"))].into_iter().enumerate() {
        if group.is_some() && !ctx.caps.groups.is_supported() {
            continue;
        }
        let topic = ctx.topic(&format!("t{i}"));
        let mut opts = SubscribeOptions::new(&topic)
            .max_attempts(5)
            .ack_timeout(Duration::from_secs(10));
        opts.group = group.clone();
        let mut sub = b.subscribe(opts).await?;
        let sent = b.publish(&topic, msg(1)).await?;
        let d = recv(&mut sub, WAIT).await?;
        ensure!(d.id == sent.id && d.attempt() == 1, "first delivery: {d:?}");
        d.nack(None).await?;
        let d = recv(&mut sub, WAIT).await?;
        ensure!(d.id == sent.id, "redelivered another message: {d:?}");
        ensure!(
            d.attempt() == 2,
            "redelivery has attempt {} (group {group:?})",
            d.attempt()
        );
        ensure!(num(&d)? == 1, "headers lost on redelivery");
        d.ack().await?;
        expect_none(&mut sub, QUIET).await?;
    }
    Ok(())
}

/// A nack with a delay redelivers after the delay, not before.
pub async fn nack_with_delay(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("nack delay", ctx.caps.nack_delay)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut sub = b
        .subscribe(
            SubscribeOptions::new(&topic)
                .group(ctx.name("delay"))
                .ack_timeout(Duration::from_secs(3))
                .max_attempts(5),
        )
        .await?;
    b.publish(&topic, msg(1)).await?;
    let d = recv(&mut sub, WAIT).await?;
    let delay = Duration::from_millis(800);
    let nacked = Instant::now();
    d.nack(Some(delay)).await?;
    let d = recv(&mut sub, WAIT).await?;
    let waited = nacked.elapsed();
    ensure!(
        d.attempt() == 2,
        "attempt {} after a delayed nack",
        d.attempt()
    );
    ensure!(
        waited >= delay.mul_f64(0.8),
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    d.ack().await?;
    Ok(())
}

/// An unsettled delivery (consumer alive but silent) comes back after the ack timeout.
pub async fn ack_timeout_redelivers(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("ack timeout", ctx.caps.ack_timeout)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let timeout = Duration::from_secs(1);
    let mut sub = b
        .subscribe(
            SubscribeOptions::new(&topic)
                .ack_timeout(timeout)
                .max_attempts(5),
        )
        .await?;
    let sent = b.publish(&topic, msg(1)).await?;
    let first = recv(&mut sub, WAIT).await?;
    let got_at = Instant::now();
    let again = recv(&mut sub, WAIT).await?;
    let waited = got_at.elapsed();
    ensure!(again.id == sent.id, "another message came: {again:?}");
    ensure!(
        again.attempt() == 2,
        "attempt {} after an ack timeout",
        again.attempt()
    );
    ensure!(
        waited >= timeout.mul_f64(0.8),
        "redelivered after {waited:?}, before the {timeout:?} ack timeout"
    );
    again.ack().await?;
    // The first delivery is stale now: settling it must not resurrect the message.
    let _ = first.ack().await;
    expect_none(&mut sub, QUIET).await
}

/// A group member that dies without acknowledging: its message goes to another member.
pub async fn consumer_death_redelivers(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("consumer groups", ctx.caps.groups)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let opts = SubscribeOptions::new(&topic)
        .group(ctx.name("death"))
        .ack_timeout(Duration::from_secs(1))
        .max_attempts(5)
        .prefetch(1);
    let mut doomed = b.subscribe(opts.clone()).await?;
    let sent = b.publish(&topic, msg(1)).await?;
    let d = recv(&mut doomed, WAIT).await?;
    ensure!(d.id == sent.id, "wrong message");
    let mut survivor = b.subscribe(opts).await?;
    // The consumer dies: its delivery and subscription go away unsettled.
    drop(d);
    drop(doomed);
    let d = recv(&mut survivor, WAIT).await?;
    ensure!(d.id == sent.id, "survivor got another message");
    d.ack().await?;
    expect_none(&mut survivor, QUIET).await
}

/// Nacked on every attempt: after `max_attempts` the message is in the dead letters, with the
/// original id, payload and a reason.
pub async fn dead_letter_after_max_attempts(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("dead letters", ctx.caps.dead_letter)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut sub = b
        .subscribe(
            SubscribeOptions::new(&topic)
                .group(ctx.name("dlq"))
                .max_attempts(3)
                .ack_timeout(Duration::from_secs(10)),
        )
        .await?;
    let sent = msg(7);
    b.publish(&topic, sent.clone()).await?;
    for attempt in 1..=3 {
        let d = recv(&mut sub, WAIT).await?;
        ensure!(d.id == sent.id, "wrong message");
        ensure!(
            d.attempt() == attempt,
            "attempt {} != {attempt}",
            d.attempt()
        );
        d.nack(None).await?;
    }
    expect_none(&mut sub, QUIET).await?;
    let mut dlq = b.dead_letters(&topic).await?;
    let d = recv(&mut dlq, WAIT).await?;
    ensure!(d.id == sent.id, "dead letter id {} != {}", d.id, sent.id);
    ensure!(d.payload == sent.payload, "dead letter payload differs");
    ensure!(num(&d)? == 7, "dead letter lost its headers");
    ensure!(
        d.header(DLQ_REASON_HEADER).is_some(),
        "no reason on the dead letter: {:?}",
        d.headers
    );
    d.ack().await?;
    Ok(())
}

/// Never settled: after `max_attempts` ack timeouts the message is dead-lettered.
pub async fn dead_letter_after_timeouts(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("dead letters", ctx.caps.dead_letter)?;
    ctx.require("ack timeout", ctx.caps.ack_timeout)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut sub = b
        .subscribe(
            SubscribeOptions::new(&topic)
                .group(ctx.name("dlq-timeout"))
                .max_attempts(2)
                .ack_timeout(Duration::from_millis(800)),
        )
        .await?;
    let sent = b.publish(&topic, msg(3)).await?;
    let mut held = Vec::new();
    for attempt in 1..=2 {
        let d = recv(&mut sub, WAIT).await?;
        ensure!(
            d.id == sent.id && d.attempt() == attempt,
            "unexpected {d:?}"
        );
        held.push(d);
    }
    let mut dlq = b.dead_letters(&topic).await?;
    // The subscription must keep running for adapters that dead-letter on the next delivery.
    let letter = tokio::select! {
        d = recv(&mut dlq, WAIT) => d?,
        extra = recv(&mut sub, WAIT) => return Err(anyhow!("delivered again past max_attempts: {:?}", extra?)),
    };
    ensure!(letter.id == sent.id, "wrong dead letter");
    letter.ack().await?;
    drop(held);
    Ok(())
}

/// `reject` dead-letters at once.
pub async fn reject_dead_letters(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("dead letters", ctx.caps.dead_letter)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut sub = b
        .subscribe(SubscribeOptions::new(&topic).max_attempts(5))
        .await?;
    let sent = b.publish(&topic, msg(9)).await?;
    let d = recv(&mut sub, WAIT).await?;
    d.reject("poison").await?;
    expect_none(&mut sub, QUIET).await?;
    let mut dlq = b.dead_letters(&topic).await?;
    let d = recv(&mut dlq, WAIT).await?;
    ensure!(d.id == sent.id, "wrong dead letter");
    ensure!(d.header(DLQ_REASON_HEADER).is_some(), "no reason header");
    d.ack().await?;
    Ok(())
}

/// A group's consumer closes half-way and a new one resumes: nothing acknowledged comes back,
/// nothing else is lost (including what was published while no member was running).
pub async fn no_loss_across_restart(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("durable groups", ctx.caps.durable_groups)?;
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let opts = SubscribeOptions::new(&topic)
        .group(ctx.name("restart"))
        .ack_timeout(Duration::from_secs(1))
        .prefetch(5);
    let mut first = b.subscribe(opts.clone()).await?;
    for i in 0..20 {
        b.publish(&topic, msg(i)).await?;
    }
    let acked: HashSet<usize> = collect_acked(&mut first, 10, WAIT)
        .await?
        .iter()
        .map(num)
        .collect::<anyhow::Result<_>>()?;
    first.close().await?;
    for i in 20..30 {
        b.publish(&topic, msg(i)).await?;
    }
    let mut second = b.subscribe(opts).await?;
    let expected: BTreeSet<usize> = (0..30).filter(|i| !acked.contains(i)).collect();
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + WAIT * 2;
    while got.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = recv(&mut second, left)
            .await
            .map_err(|e| anyhow!("{e}; got {} of {}", got.len(), expected.len()))?;
        let n = num(&d)?;
        ensure!(!acked.contains(&n), "acknowledged message {n} came back");
        got.insert(n);
        d.ack().await?;
    }
    ensure!(
        got == expected,
        "resumed with {got:?}, expected {expected:?}"
    );
    expect_none(&mut second, QUIET).await
}

/// 4 publishers and a group of 4 consumers, plus 2 fanout subscribers: every message is
/// delivered once to the group and once to each fanout subscriber.
pub async fn concurrent_publishers_and_subscribers(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("consumer groups", ctx.caps.groups)?;
    let topic = ctx.topic("t");
    let b = ctx.backend.clone();
    let (publishers, per_publisher) = (4, 50);
    let total = publishers * per_publisher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, usize)>();
    let mut tasks = Vec::new();
    // Subscriber 0..4: the group; 4 and 5: fanout.
    for who in 0..6 {
        let opts = if who < 4 {
            SubscribeOptions::new(&topic)
                .group(ctx.name("c4x4"))
                .ack_timeout(Duration::from_secs(20))
                .prefetch(8)
        } else {
            SubscribeOptions::new(&topic).ack_timeout(Duration::from_secs(20))
        };
        let mut sub = b.subscribe(opts).await?;
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(d) = sub.next().await {
                let n = num(&d)?;
                d.ack().await?;
                if tx.send((who, n)).is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        }));
    }
    drop(tx);
    let mut pubs = Vec::new();
    for p in 0..publishers {
        let b = b.clone();
        let topic = topic.clone();
        pubs.push(tokio::spawn(async move {
            let base = p * per_publisher;
            let half = per_publisher / 2;
            for i in 0..half {
                b.publish(&topic, msg(base + i)).await?;
            }
            let batch = (half..per_publisher).map(|i| msg(base + i)).collect();
            b.publish_batch(&topic, batch).await?;
            anyhow::Ok(())
        }));
    }
    for p in pubs {
        p.await??;
    }
    let mut group: BTreeMap<usize, usize> = BTreeMap::new();
    let mut fan: [BTreeMap<usize, usize>; 2] = [BTreeMap::new(), BTreeMap::new()];
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = |g: &BTreeMap<usize, usize>, f: &[BTreeMap<usize, usize>; 2]| {
        g.len() == total && f.iter().all(|m| m.len() == total)
    };
    while !done(&group, &fan) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((who, n))) = tokio::time::timeout(left, rx.recv()).await else {
            return Err(anyhow!(
                "group got {} of {total}, fanout got {} and {}",
                group.len(),
                fan[0].len(),
                fan[1].len()
            ));
        };
        let m = if who < 4 {
            &mut group
        } else {
            &mut fan[who - 4]
        };
        *m.entry(n).or_default() += 1;
    }
    // Anything still coming is a duplicate.
    tokio::time::sleep(QUIET).await;
    while let Ok((who, n)) = rx.try_recv() {
        let m = if who < 4 {
            &mut group
        } else {
            &mut fan[who - 4]
        };
        *m.entry(n).or_default() += 1;
    }
    for t in &tasks {
        t.abort();
    }
    ensure!(group.values().all(|c| *c == 1), "group duplicates");
    for f in &fan {
        ensure!(f.values().all(|c| *c == 1), "fanout duplicates");
    }
    Ok(())
}

/// After `close`: publishing and subscribing fail with `Closed`, subscriptions end with `Closed`.
pub async fn close_semantics(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let topic = ctx.topic("t");
    let fx = ctx.second_backend().await?;
    let b = fx.backend.clone();
    let mut sub = b.subscribe(SubscribeOptions::new(&topic)).await?;
    b.publish(&topic, msg(1)).await?;
    let d = recv(&mut sub, WAIT).await?;
    d.ack().await?;
    b.close().await?;
    match b.publish(&topic, msg(2)).await {
        Err(BackendError::Closed) => {}
        other => return Err(anyhow!("publish after close: {other:?}")),
    }
    match b.publish_batch(&topic, vec![msg(3)]).await {
        Err(BackendError::Closed) => {}
        other => return Err(anyhow!("publish_batch after close: {other:?}")),
    }
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Err(BackendError::Closed)) => {}
        Ok(other) => return Err(anyhow!("subscription after close: {other:?}")),
        Err(_) => return Err(anyhow!("subscription did not end after close")),
    }
    match b.subscribe(SubscribeOptions::new(&topic)).await {
        Err(BackendError::Closed) => {}
        Ok(_) => return Err(anyhow!("subscribe after close succeeded")),
        Err(e) => return Err(anyhow!("subscribe after close: {e:?}")),
    }
    // Closing twice is fine.
    b.close().await?;
    Ok(())
}

/// Wildcard filters (`*` one level, trailing `#` one or more) receive exactly the matching
/// topics; backends without wildcards refuse them with `Unsupported`.
pub async fn wildcards(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let base = ctx.topic("w");
    let b = &ctx.backend;
    if ctx.caps.wildcards == Support::Unsupported {
        match b
            .subscribe(SubscribeOptions::new(format!("{base}.*")))
            .await
        {
            Err(BackendError::Unsupported { .. }) => {}
            other => {
                return Err(anyhow!(
                    "wildcard subscribe without support: {:?}",
                    other.err()
                ))
            }
        }
        return Err(Skip(format!("{} does not support wildcards", b.name())).into());
    }
    let mut one = b
        .subscribe(SubscribeOptions::new(format!("{base}.*")))
        .await?;
    let mut many = b
        .subscribe(SubscribeOptions::new(format!("{base}.#")))
        .await?;
    let topics = [
        ctx.topic("w.a"),
        ctx.topic("w.b"),
        ctx.topic("w.a.deep"),
        ctx.topic("other.a"),
    ];
    for (i, t) in topics.iter().enumerate() {
        b.publish(t, msg(i)).await?;
    }
    let got: BTreeSet<String> = collect_acked(&mut one, 2, WAIT)
        .await?
        .iter()
        .map(|m| num(m).map(|n| topics[n].clone()))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        got == topics[..2].iter().cloned().collect(),
        "`*` matched {got:?}"
    );
    expect_none(&mut one, QUIET).await?;
    let mut got = BTreeSet::new();
    for _ in 0..3 {
        let d = recv(&mut many, WAIT).await?;
        ensure!(
            d.topic() == topics[num(&d)?],
            "delivery topic {} is not the published one",
            d.topic()
        );
        got.insert(d.topic().to_string());
        d.ack().await?;
    }
    ensure!(
        got == topics[..3].iter().cloned().collect(),
        "`#` matched {got:?}"
    );
    expect_none(&mut many, Duration::from_millis(100)).await
}

/// `Start::Latest` sees only what comes after subscribing; `Start::Earliest` replays what is
/// retained. Backends without replay refuse `Earliest` with `Unsupported`.
pub async fn start_positions(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    if ctx.caps.replay == Support::Unsupported {
        match b
            .subscribe(SubscribeOptions::new(&topic).start(Start::Earliest))
            .await
        {
            Err(BackendError::Unsupported { .. }) => {}
            other => {
                return Err(anyhow!(
                    "Earliest without replay support: {:?}",
                    other.err()
                ))
            }
        }
        return Err(Skip(format!("{} does not support replay", b.name())).into());
    }
    // A fanout subscription first, so that in-memory Ferry has a reader for the first message.
    let mut keep = b.subscribe(SubscribeOptions::new(&topic)).await?;
    b.publish(&topic, msg(0)).await?;
    let mut latest = b.subscribe(SubscribeOptions::new(&topic)).await?;
    b.publish(&topic, msg(1)).await?;
    let d = recv(&mut latest, WAIT).await?;
    ensure!(num(&d)? == 1, "Latest delivered message {} first", num(&d)?);
    d.ack().await?;
    let mut earliest = b
        .subscribe(SubscribeOptions::new(&topic).start(Start::Earliest))
        .await?;
    let got: Vec<usize> = collect_acked(&mut earliest, 2, WAIT)
        .await?
        .iter()
        .map(num)
        .collect::<anyhow::Result<_>>()?;
    ensure!(got == vec![0, 1], "Earliest replayed {got:?}");
    let mut group = b
        .subscribe(
            SubscribeOptions::new(&topic)
                .group(ctx.name("replay"))
                .start(Start::Earliest),
        )
        .await?;
    let got: Vec<usize> = collect_acked(&mut group, 2, WAIT)
        .await?
        .iter()
        .map(num)
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        got == vec![0, 1],
        "a new group from Earliest replayed {got:?}"
    );
    collect_acked(&mut keep, 2, WAIT).await?;
    Ok(())
}

/// Invalid input is a typed error, not a panic.
pub async fn invalid_input(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let b = &ctx.backend;
    match b.publish("", msg(0)).await {
        Err(BackendError::Invalid(_)) => {}
        other => return Err(anyhow!("publish to an empty topic: {other:?}")),
    }
    match b.publish("a.*", msg(0)).await {
        Err(BackendError::Invalid(_)) => {}
        other => return Err(anyhow!("publish to a wildcard: {other:?}")),
    }
    let topic = ctx.topic("t");
    match b
        .subscribe(SubscribeOptions::new(&topic).max_attempts(0))
        .await
    {
        Err(BackendError::Invalid(_)) => {}
        other => return Err(anyhow!("max_attempts 0: {:?}", other.err())),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Features above the contract, through a `Queue`.
// ---------------------------------------------------------------------------------------------

fn queue(ctx: &Ctx) -> Queue {
    Queue::new(ctx.backend.clone())
}

/// Registers the lane topics of `topic` for cleanup, returns `topic`.
fn lanes(ctx: &Ctx, name: &str) -> String {
    let topic = ctx.topic(name);
    for p in [Priority::High, Priority::Low] {
        // Registered so that the harness deletes them too.
        ctx.topic(&format!("{name}.prio-{}", p.as_str()));
    }
    topic
}

/// No `ferry-dlq-*` header left.
fn no_dlq_headers(m: &BackendMessage) -> anyhow::Result<()> {
    ensure!(
        !m.headers.keys().any(|k| k.starts_with("ferry-dlq-")),
        "dead-letter headers left: {:?}",
        m.headers
    );
    Ok(())
}

/// A delayed message is not handed over before it is due, is handed over after, and the
/// deferrals (several on Redis, whose nack delay is capped at the ack timeout) do not count as
/// attempts.
pub async fn queue_delayed_delivery(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("delayed delivery", ctx.caps.delayed_delivery)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    let mut sub = q
        .subscribe(
            SubscribeOptions::new(&topic)
                .group(ctx.name("delayed"))
                .ack_timeout(Duration::from_millis(400))
                .max_attempts(2),
        )
        .await?;
    let delay = Duration::from_millis(1500);
    let delayed = msg(1).with_delay(delay);
    let due = delayed
        .deliver_at()
        .ok_or_else(|| anyhow!("with_delay set no valid header"))?;
    q.publish(&topic, delayed.clone()).await?;
    q.publish(&topic, msg(2)).await?;
    // The undelayed one comes at once, the delayed one not before it is due.
    let d = sub_recv(&mut sub, WAIT).await?;
    ensure!(num(&d)? == 2, "the delayed message came first");
    d.ack().await?;
    let early = tokio::time::timeout(Duration::from_millis(900), sub.next()).await;
    if let Ok(d) = early {
        let d = d?;
        return Err(anyhow!("{} handed over before it was due", d.id));
    }
    let d = sub_recv(&mut sub, WAIT).await?;
    let now = SystemTime::now();
    ensure!(d.id == delayed.id, "another message: {d:?}");
    // Headers carry milliseconds: allow for the rounding.
    ensure!(
        now + Duration::from_millis(2) >= due,
        "handed over {:?} before it was due",
        due.duration_since(now).unwrap_or_default()
    );
    ensure!(
        d.attempt() == 1,
        "the deferrals counted as attempts: attempt {}",
        d.attempt()
    );
    d.ack().await?;
    let stats = sub.stats();
    ensure!(
        stats.delivered == 2 && stats.acked == 2 && stats.in_flight == 0,
        "stats {stats:?}"
    );
    sub_none(&mut sub, QUIET).await?;
    ensure!(
        q.dead_letters(&topic, 10).await?.is_empty(),
        "the delayed message was dead-lettered"
    );
    Ok(())
}

/// An expired message is never handed over (and counted where the queue drops it); one whose
/// TTL has not passed is.
pub async fn queue_ttl_expiry(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("ttl", ctx.caps.ttl)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    let mut sub = q.subscribe(SubscribeOptions::new(&topic)).await?;
    let short = msg(1).with_ttl(Duration::from_millis(300));
    q.publish(&topic, short.clone()).await?;
    q.publish(&topic, msg(2).with_ttl(Duration::from_secs(60)))
        .await?;
    q.publish(
        &topic,
        msg(3).with_expires_at(SystemTime::now() - Duration::from_secs(1)),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let d = sub_recv(&mut sub, WAIT).await?;
    ensure!(
        num(&d)? == 2,
        "expected the live message, got {} ({:?})",
        num(&d)?,
        d.headers
    );
    d.ack().await?;
    sub_none(&mut sub, QUIET).await?;
    let stats = q.stats();
    if ctx.caps.ttl == Support::Emulated {
        ensure!(stats.expired == 2, "expired count {} != 2", stats.expired);
    }
    ensure!(stats.delivered == 1, "delivered {}", stats.delivered);
    Ok(())
}

/// With deliveries ready in several lanes, higher lanes come first.
pub async fn queue_priority_lanes(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("priority", ctx.caps.priority)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    // The engine orders its own backlog (a subscriber holding one delivery leaves the rest
    // there); emulated lanes order what each lane's subscription has ready.
    let prefetch = if ctx.caps.priority == Support::Native {
        1
    } else {
        64
    };
    let mut sub = q
        .subscribe(
            SubscribeOptions::new(&topic)
                .group(ctx.name("prio"))
                .prefetch(prefetch),
        )
        .await?;
    let order = [
        (0, Priority::Low),
        (1, Priority::Low),
        (2, Priority::Normal),
        (3, Priority::High),
        (4, Priority::Low),
        (5, Priority::High),
    ];
    for (i, p) in order {
        q.publish(&topic, msg(i).with_priority(p)).await?;
    }
    // Let every lane have its deliveries ready (emulated lanes are separate subscriptions
    // whose first pull may take a while on a loaded machine).
    let settle = if ctx.caps.priority == Support::Native {
        Duration::from_millis(700)
    } else {
        Duration::from_millis(2500)
    };
    tokio::time::sleep(settle).await;
    let mut got = Vec::new();
    for _ in 0..order.len() {
        let d = sub_recv(&mut sub, WAIT).await?;
        got.push((num(&d)?, d.priority()));
        d.ack().await?;
    }
    // The first delivery may have been handed over before the others were published (a
    // subscriber holds one with prefetch 1); from then on, highest lane first, FIFO per lane.
    let rest = if got.first().is_some_and(|(n, _)| *n == 0) {
        &got[1..]
    } else {
        &got[..]
    };
    let mut expected: Vec<(usize, Priority)> = rest.to_vec();
    expected.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ensure!(
        rest == expected.as_slice(),
        "delivered as {got:?}, not highest lane first"
    );
    sub_none(&mut sub, QUIET).await
}

/// The same id published twice within the window is delivered once; and a subscription drops a
/// message whose id it already acknowledged.
pub async fn queue_dedup(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("de-duplication", ctx.caps.dedup)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    let mut sub = q.subscribe(SubscribeOptions::new(&topic)).await?;
    let m = msg(1);
    let first = q.publish(&topic, m.clone()).await?;
    ensure!(!first.is_duplicate(), "the first publish was a duplicate");
    let second = q.publish(&topic, m.clone()).await?;
    if ctx.caps.dedup == Support::Emulated {
        ensure!(second.is_duplicate(), "the second publish was stored");
    }
    let d = sub_recv(&mut sub, WAIT).await?;
    ensure!(d.id == m.id, "wrong message");
    d.ack().await?;
    sub_none(&mut sub, QUIET).await?;
    // Consumer side: the same id stored twice by the backend (published without the queue).
    let again = msg(2);
    ctx.backend.publish(&topic, again.clone()).await?;
    let d = sub_recv(&mut sub, WAIT).await?;
    ensure!(d.id == again.id, "wrong message");
    d.ack().await?;
    ctx.backend.publish(&topic, again.clone()).await?;
    ctx.backend.publish(&topic, msg(3)).await?;
    let d = sub_recv(&mut sub, WAIT).await?;
    ensure!(num(&d)? == 3, "the duplicate was handed over: {d:?}");
    d.ack().await?;
    if ctx.caps.dedup == Support::Emulated {
        // NATS drops the duplicate publish itself; elsewhere the subscription dropped it.
        ensure!(
            sub.stats().deduplicated == 1,
            "deduplicated {}",
            sub.stats().deduplicated
        );
    }
    sub_none(&mut sub, QUIET).await
}

/// A failing handler is retried with growing delays, then dead-lettered with its error text.
pub async fn queue_retries_then_dead_letter(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("retries", ctx.caps.retries)?;
    ctx.require("dead letters", ctx.caps.dead_letter)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    let calls: Arc<parking_lot::Mutex<Vec<(Instant, u32)>>> = Arc::default();
    let seen = calls.clone();
    let handler = tower::service_fn(move |job: Job| {
        let seen = seen.clone();
        async move {
            seen.lock().push((Instant::now(), job.attempt));
            Err::<(), BoxError>(format!("boom on attempt {}", job.attempt).into())
        }
    });
    let backoff = Backoff::exponential(Duration::from_millis(300))
        .with_max(Duration::from_secs(2))
        .with_jitter(0.1);
    let worker = q
        .serve(
            // The second retry waits longer than the ack timeout (Redis caps nack delays there).
            SubscribeOptions::new(&topic)
                .group(ctx.name("retry"))
                .ack_timeout(Duration::from_millis(400))
                .max_attempts(3),
            backoff,
            handler,
        )
        .await?;
    let sent = msg(4);
    q.publish(&topic, sent.clone()).await?;
    let deadline = Instant::now() + WAIT * 2;
    while calls.lock().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(QUIET).await;
    let stats = worker.stats();
    worker.stop().await?;
    let calls = calls.lock().clone();
    ensure!(calls.len() == 3, "{} handler calls, not 3", calls.len());
    let attempts: Vec<u32> = calls.iter().map(|c| c.1).collect();
    ensure!(attempts == [1, 2, 3], "attempts {attempts:?}");
    // Lower bounds only: the n-th retry waits at least (1 - jitter) of its backoff delay, less
    // the coarse rounding of nack delays (at most 1/8).
    for (n, pair) in calls.windows(2).enumerate() {
        let gap = pair[1].0.duration_since(pair[0].0);
        let base = Duration::from_millis(300) * 2u32.pow(u32::try_from(n)?);
        ensure!(
            gap >= base.mul_f64(0.9 * 0.875),
            "retry {} after {gap:?}, before its {base:?} backoff",
            n + 1
        );
    }
    ensure!(
        stats.handler_errors == 3 && stats.nacked == 2 && stats.dead_lettered == 1,
        "stats {stats:?}"
    );
    let letters = q.dead_letters(&topic, 10).await?;
    ensure!(letters.len() == 1, "{} dead letters", letters.len());
    let l = &letters[0];
    ensure!(l.message.id == sent.id, "wrong dead letter");
    ensure!(
        l.reason.contains("boom on attempt 3"),
        "reason {:?} is not the handler's error",
        l.reason
    );
    ensure!(l.source_topic == topic, "source topic {}", l.source_topic);
    no_dlq_headers(&l.message)
}

/// A `Permanent` error dead-letters at once, with its text.
pub async fn queue_permanent_failure(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("dead letters", ctx.caps.dead_letter)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = tower::service_fn(move |_job: Job| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), BoxError>(Box::new(Permanent::new("malformed order"))) }
    });
    let worker = q
        .serve(
            SubscribeOptions::new(&topic).max_attempts(5),
            Backoff::constant(Duration::from_millis(50)),
            handler,
        )
        .await?;
    let sent = msg(5);
    q.publish(&topic, sent.clone()).await?;
    let letters = poll_dead_letters(&q, &topic, 1).await?;
    tokio::time::sleep(QUIET).await;
    worker.stop().await?;
    ensure!(calls.load(Ordering::SeqCst) == 1, "handler retried");
    ensure!(letters[0].message.id == sent.id, "wrong dead letter");
    ensure!(
        letters[0].reason == "malformed order",
        "reason {:?}",
        letters[0].reason
    );
    Ok(())
}

/// Waits for at least `n` dead letters of `topic`.
async fn poll_dead_letters(
    q: &Queue,
    topic: &str,
    n: usize,
) -> anyhow::Result<Vec<ferry_backends::DeadLetterInfo>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let letters = q.dead_letters(topic, 100).await?;
        if letters.len() >= n {
            return Ok(letters);
        }
        ensure!(
            Instant::now() < deadline,
            "{} dead letters of {n}",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Dead letters are listed with reason, attempts and source topic; a redriven one arrives again
/// on its source topic without dead-letter headers and with fresh attempts; purge empties them.
pub async fn queue_redrive_and_purge(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("dead letters", ctx.caps.dead_letter)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    if !ctx.caps.redrive.is_supported() {
        for (what, r) in [
            ("redrive", q.redrive(&topic, 10).await),
            ("purge", q.purge(&topic).await),
        ] {
            ensure!(
                matches!(r, Err(BackendError::Unsupported { .. })),
                "{what} without the capability: {r:?}"
            );
        }
        return Err(Skip(format!("{} does not support redrive", ctx.backend.name())).into());
    }
    let mut sub = q
        .subscribe(
            SubscribeOptions::new(&topic)
                .group(ctx.name("redrive"))
                .max_attempts(2),
        )
        .await?;
    let sent: Vec<BackendMessage> = (0..3).map(msg).collect();
    for m in &sent {
        q.publish(&topic, m.clone()).await?;
    }
    // Message 0 is nacked on both its attempts, the others rejected.
    for _ in 0..4 {
        let d = sub_recv(&mut sub, WAIT).await?;
        let n = num(&d)?;
        if n == 0 {
            d.nack(None).await?;
        } else {
            ensure!(d.attempt() == 1, "rejected message came back: {d:?}");
            d.reject(format!("poison {n}")).await?;
        }
    }
    sub_none(&mut sub, QUIET).await?;
    let mut letters = poll_dead_letters(&q, &topic, 3).await?;
    letters.sort_by_key(|l| num(&l.message).unwrap_or(usize::MAX));
    ensure!(letters.len() == 3, "{} dead letters", letters.len());
    for l in &letters {
        ensure!(l.source_topic == topic, "source topic {}", l.source_topic);
        no_dlq_headers(&l.message)?;
        let n = num(&l.message)?;
        if n == 0 {
            ensure!(
                l.attempts == 2,
                "dead letter {n}: {} attempts, not 2",
                l.attempts
            );
        } else {
            ensure!(
                l.reason == format!("poison {n}"),
                "dead letter {n}: reason {:?}",
                l.reason
            );
            ensure!(
                l.attempts == 1,
                "dead letter {n}: {} attempts, not 1",
                l.attempts
            );
        }
    }
    // Listing leaves them in place.
    ensure!(
        q.dead_letters(&topic, 10).await?.len() == 3,
        "listing consumed dead letters"
    );
    let redriven = q.redrive(&topic, 2).await?;
    ensure!(redriven == 2, "redrove {redriven}, not 2");
    let mut back = Vec::new();
    for _ in 0..2 {
        let d = sub_recv(&mut sub, WAIT).await?;
        ensure!(d.topic() == topic, "redriven to {}", d.topic());
        ensure!(d.attempt() == 1, "redriven with attempt {}", d.attempt());
        no_dlq_headers(d.message())?;
        ensure!(
            sent.iter().any(|m| m.id == d.id && m.payload == d.payload),
            "redriven message {d:?} is not one of those sent"
        );
        back.push(d.id.clone());
        d.ack().await?;
    }
    ensure!(back[0] != back[1], "the same dead letter redriven twice");
    sub_none(&mut sub, QUIET).await?;
    ensure!(
        q.stats().redriven == 2,
        "redriven count {}",
        q.stats().redriven
    );
    let left = q.dead_letters(&topic, 10).await?;
    ensure!(left.len() == 1, "{} dead letters left, not 1", left.len());
    let purged = q.purge(&topic).await?;
    ensure!(purged == 1, "purged {purged}, not 1");
    ensure!(
        q.dead_letters(&topic, 10).await?.is_empty(),
        "dead letters left after purge"
    );
    Ok(())
}

/// Handlers are tower services: a timeout layer turns a slow call into a retried failure, a
/// concurrency limit bounds the calls under way.
pub async fn queue_middleware(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("retries", ctx.caps.retries)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done: Arc<parking_lot::Mutex<Vec<(usize, u32)>>> = Arc::default();
    let (r, p, dn) = (running.clone(), peak.clone(), done.clone());
    let handler = tower::service_fn(move |job: Job| {
        let (r, p, dn) = (r.clone(), p.clone(), dn.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            // A call cut short by the timeout is dropped: count it as done then.
            let _running = Running(r.clone());
            let n: usize = job.header("n").and_then(|v| v.parse().ok()).unwrap_or(0);
            // Message 0 hangs on its first attempt: the timeout layer cuts it short.
            let pause = if n == 0 && job.attempt == 1 {
                Duration::from_secs(3)
            } else {
                Duration::from_millis(30)
            };
            tokio::time::sleep(pause).await;
            dn.lock().push((n, job.attempt));
            Ok::<(), BoxError>(())
        }
    });
    let service = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .timeout(Duration::from_millis(200))
        .service(handler);
    let worker = q
        .serve(
            SubscribeOptions::new(&topic)
                .ack_timeout(Duration::from_secs(5))
                .max_attempts(3),
            Backoff::constant(Duration::from_millis(100)),
            service,
        )
        .await?;
    for i in 0..4 {
        q.publish(&topic, msg(i)).await?;
    }
    let deadline = Instant::now() + WAIT;
    while done.lock().len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = worker.stats();
    worker.stop().await?;
    let done = done.lock().clone();
    let handled: BTreeSet<usize> = done.iter().map(|d| d.0).collect();
    ensure!(
        handled == (0..4).collect(),
        "handled {done:?}, not all of 0..4"
    );
    ensure!(
        done.contains(&(0, 2)),
        "message 0 was not retried after its time-out: {done:?}"
    );
    ensure!(
        peak.load(Ordering::SeqCst) == 1,
        "{} calls at once despite the concurrency limit of 1",
        peak.load(Ordering::SeqCst)
    );
    ensure!(
        stats.handler_errors == 1 && stats.acked == 4 && stats.nacked == 1,
        "stats {stats:?}"
    );
    Ok(())
}

/// Decrements the count of running calls when the call ends or is dropped.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The counters of the queue, a topic and a subscription follow what happened.
pub async fn queue_stats(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    ctx.require("dead letters", ctx.caps.dead_letter)?;
    let q = queue(&ctx);
    let topic = lanes(&ctx, "t");
    let other = lanes(&ctx, "u");
    let mut sub = q
        .subscribe(SubscribeOptions::new(&topic).max_attempts(5))
        .await?;
    for i in 0..3 {
        q.publish(&topic, msg(i)).await?;
    }
    q.publish(&other, msg(9)).await?;
    let mut nacked = false;
    let mut settled = 0;
    while settled < 3 {
        let d = sub_recv(&mut sub, WAIT).await?;
        let in_flight = sub.stats().in_flight;
        ensure!(in_flight == 1, "in flight {in_flight} while holding one");
        match num(&d)? {
            0 if !nacked => {
                nacked = true;
                d.nack(None).await?;
            }
            1 => {
                d.reject("no").await?;
                settled += 1;
            }
            _ => {
                d.ack().await?;
                settled += 1;
            }
        }
    }
    // Publishing is not the subscription's doing.
    let expect = Stats {
        delivered: 4,
        acked: 2,
        nacked: 1,
        dead_lettered: 1,
        ..Stats::default()
    };
    ensure!(sub.stats() == expect, "subscription {:?}", sub.stats());
    ensure!(
        q.topic_stats(&topic).delivered == 4,
        "topic {:?}",
        q.topic_stats(&topic)
    );
    ensure!(
        q.topic_stats(&topic).published == 3,
        "topic {:?}",
        q.topic_stats(&topic)
    );
    ensure!(
        q.topic_stats(&other).published == 1,
        "other topic {:?}",
        q.topic_stats(&other)
    );
    let total = q.stats();
    ensure!(
        total.published == 4 && total.acked == 2 && total.in_flight == 0,
        "total {total:?}"
    );
    Ok(())
}

async fn sub_recv(sub: &mut QueueSubscription, within: Duration) -> anyhow::Result<Delivery> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(anyhow!("no delivery within {within:?}")),
    }
}

async fn sub_none(sub: &mut QueueSubscription, within: Duration) -> anyhow::Result<()> {
    match tokio::time::timeout(within, sub.next()).await {
        Err(_) => Ok(()),
        Ok(Ok(d)) => Err(anyhow!(
            "unexpected delivery {} (attempt {}) on {}",
            d.id,
            d.attempt(),
            d.topic()
        )),
        Ok(Err(e)) => Err(anyhow!("subscription failed while expecting silence: {e}")),
    }
}

/// A publish whose record may have been stored although it failed is `InDoubt` (code
/// `in_doubt`), never a plain rejection; the `Queue` reports it too (it resends in doubt only
/// where the backend de-duplicates natively), and lets the same id through again once storage
/// works, so the caller's retry is stored and delivered. Needs injectable storage failures
/// (the embedded engine over `FaultyStorage`); other backends skip.
pub async fn publish_in_doubt(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let Some(faults) = ctx.faults.clone() else {
        return Err(Skip(format!(
            "{}: no storage failure can be injected here",
            ctx.backend.name()
        ))
        .into());
    };
    let topic = ctx.topic("t");
    let b = &ctx.backend;
    let mut sub = b.subscribe(SubscribeOptions::new(&topic)).await?;
    b.publish(&topic, msg(0)).await?;
    let d = recv(&mut sub, WAIT).await?;
    ensure!(num(d.message())? == 0, "wrong first message");
    d.ack().await?;

    faults.fail_appends(true);
    let e = b
        .publish(&topic, msg(1))
        .await
        .err()
        .ok_or_else(|| anyhow!("a publish with failing writes succeeded"))?;
    ensure!(e.is_in_doubt(), "not in doubt: {e:?}");
    ensure!(e.code() == "in_doubt", "code {}", e.code());
    ensure!(!e.is_transient(), "in doubt reported as transient: {e:?}");
    let q = queue(&ctx);
    let m = msg(2);
    let e = q
        .publish(&topic, m.clone())
        .await
        .err()
        .ok_or_else(|| anyhow!("a queue publish with failing writes succeeded"))?;
    ensure!(e.is_in_doubt(), "the queue did not report in doubt: {e:?}");

    faults.fail_appends(false);
    // The caller's retry of the in-doubt message: not taken for a duplicate.
    let again = q
        .publish(&topic, m.clone())
        .await
        .map_err(|e| anyhow!("the retry once writes work again: {e}"))?;
    ensure!(
        !again.is_duplicate(),
        "the retry was dropped as a duplicate"
    );
    // Delivered (an in-doubt record that reached the store may come first).
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = recv(&mut sub, left)
            .await
            .map_err(|e| anyhow!("the retried message never arrived: {e}"))?;
        let n = num(d.message())?;
        d.ack().await?;
        ensure!(n == 1 || n == 2, "unexpected message {n}");
        if n == 2 {
            break;
        }
    }
    Ok(())
}
