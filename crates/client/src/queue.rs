//! The queue client: topic admin through the metadata leader, and each
//! partition's traffic sent to that partition's own leader.
//!
//! A topic's route (its partition count and, per partition, the replica
//! last seen leading it) is learned from `DescribeTopic` and corrected by
//! every leader hint, so after the first call a produce goes straight to
//! the right replica. `produce` splits a batch by partition exactly as the
//! servers route it ([`crate::routing::PartitionRing`]: by key, else by
//! message id, else round robin) and sends the partitions concurrently;
//! `receive` long-polls every replica that leads some partition at once;
//! `ack`/`nack`/`extend_lease` send each receipt to its partition's leader.
//!
//! Retries: a partition call that failed because of its replica (down, not
//! the leader, election) is retried elsewhere ([`Conn::call_via`]).
//! Produce is safe to retry when messages carry ids (deduplicated within
//! the topic's window); a message without an id may be stored twice when
//! a retried call had in fact succeeded (at-least-once), as with
//! JetStream without `Nats-Msg-Id`. Ids cost server memory for the
//! window, so they are the caller's choice.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use proto::queue::v1 as pb;
use proto::queue::v1::queue_service_client::QueueServiceClient;
use tonic::transport::Channel;
use tonic::Status;

use crate::routing::PartitionRing;
use crate::Conn;

/// Largest response accepted (a Receive of big messages).
const MAX_RESPONSE_BYTES: usize = 16 << 20;

fn client(ch: Channel) -> QueueServiceClient<Channel> {
    QueueServiceClient::new(ch)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES)
}

struct Route {
    ring: PartitionRing,
    /// Per partition, where its calls go.
    leaders: Vec<Arc<Mutex<Option<String>>>>,
}

/// A queue-svc client. Cheap to clone.
#[derive(Clone)]
pub struct QueueClient {
    conn: Conn,
    routes: Arc<Mutex<HashMap<String, Arc<Route>>>>,
    counter: Arc<AtomicU64>,
    /// Received messages not yet handed out, by (topic, group).
    inboxes: Arc<Mutex<Inboxes>>,
}

type Inboxes = HashMap<(String, String), Arc<Inbox>>;

/// Messages a group's long polls brought in, and the polls under way.
///
/// `receive` long-polls every partition leader at once but returns as
/// soon as any of them answers with messages; the polls still running are
/// not cancelled (a cancelled Receive could lose the leases it took until
/// they time out, and count an attempt): they finish in the background
/// and leave their messages here for the next `receive`.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct InboxState {
    msgs: std::collections::VecDeque<pb::ReceivedMessage>,
    /// Leader addresses with a poll under way.
    polling: std::collections::HashSet<String>,
    /// The last poll's failure, reported when nothing came.
    error: Option<Status>,
}

impl QueueClient {
    pub fn new(conn: Conn) -> Self {
        Self {
            conn,
            routes: Arc::default(),
            counter: Arc::default(),
            inboxes: Arc::default(),
        }
    }

    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    pub async fn create_topic(
        &self,
        name: &str,
        config: pb::TopicConfig,
    ) -> Result<pb::TopicInfo, Status> {
        let req = pb::CreateTopicRequest {
            name: name.to_owned(),
            config: Some(config),
        };
        self.conn
            .call(|ch| {
                let req = req.clone();
                async move { client(ch).create_topic(req).await.map(|r| r.into_inner()) }
            })
            .await
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), Status> {
        self.routes.lock().remove(name);
        let name = name.to_owned();
        self.conn
            .call(|ch| {
                let name = name.clone();
                async move {
                    client(ch)
                        .delete_topic(pb::DeleteTopicRequest { name })
                        .await
                        .map(|_| ())
                }
            })
            .await
    }

    pub async fn list_topics(&self, prefix: &str) -> Result<Vec<pb::TopicSummary>, Status> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListTopicsRequest {
                page_size: 1000,
                page_token: token.clone(),
                prefix: prefix.to_owned(),
            };
            let page = self
                .conn
                .call(|ch| {
                    let req = req.clone();
                    async move { client(ch).list_topics(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            out.extend(page.topics);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// The topic as the metadata leader sees it. Per-partition figures come
    /// from the replica that answered (see `PartitionInfo.stats_available`);
    /// [`QueueClient::describe_everywhere`] merges every replica's.
    pub async fn describe_topic(&self, name: &str) -> Result<pb::TopicInfo, Status> {
        let name = name.to_owned();
        let info = self
            .conn
            .call(|ch| {
                let name = name.clone();
                async move {
                    client(ch)
                        .describe_topic(pb::DescribeTopicRequest {
                            name,
                            include_consumers: true,
                        })
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        self.learn(&info);
        Ok(info)
    }

    /// Describes the topic on every known replica and keeps, per partition,
    /// the figures of the replica that leads it (and per group, the sum of
    /// those).
    pub async fn describe_everywhere(&self, name: &str) -> Result<pb::TopicInfo, Status> {
        let mut base = self.describe_topic(name).await?;
        let mut best: BTreeMap<u32, pb::PartitionInfo> = BTreeMap::new();
        let mut groups: BTreeMap<(String, u32), pb::GroupPartitionInfo> = BTreeMap::new();
        for ep in self.conn.endpoints() {
            let route = Mutex::new(Some(ep));
            let name = name.to_owned();
            let Ok(info) = self
                .conn
                .call_via(&route, |ch| {
                    let name = name.clone();
                    async move {
                        client(ch)
                            .describe_topic(pb::DescribeTopicRequest {
                                name,
                                include_consumers: true,
                            })
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await
            else {
                continue;
            };
            let answering = route.lock().clone().unwrap_or_default();
            for p in info.partitions {
                if p.stats_available && p.leader_addr == answering {
                    best.insert(p.partition, p);
                }
            }
            for g in info.groups {
                for gp in g.partitions {
                    if best
                        .get(&gp.partition)
                        .is_some_and(|p| p.leader_addr == answering)
                    {
                        groups.insert((g.name.clone(), gp.partition), gp);
                    }
                }
            }
        }
        for p in base.partitions.iter_mut() {
            if let Some(b) = best.remove(&p.partition) {
                *p = b;
            }
        }
        base.depth = base.partitions.iter().map(|p| p.depth).sum();
        base.bytes = base.partitions.iter().map(|p| p.bytes).sum();
        for g in base.groups.iter_mut() {
            g.partitions = groups
                .iter()
                .filter(|((n, _), _)| *n == g.name)
                .map(|(_, gp)| *gp)
                .collect();
            g.lag = g.partitions.iter().map(|p| p.lag).sum();
            g.in_flight = g.partitions.iter().map(|p| p.in_flight).sum();
            g.dead_letter_pending = g.partitions.iter().map(|p| p.dead_letter_pending).sum();
        }
        Ok(base)
    }

    pub async fn create_group(
        &self,
        topic: &str,
        group: &str,
        config: Option<pb::GroupConfig>,
        start: Option<pb::StartPosition>,
    ) -> Result<pb::CreateGroupResponse, Status> {
        let req = pb::CreateGroupRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            config,
            start,
        };
        self.conn
            .call(|ch| {
                let req = req.clone();
                async move { client(ch).create_group(req).await.map(|r| r.into_inner()) }
            })
            .await
    }

    pub async fn delete_group(&self, topic: &str, group: &str) -> Result<(), Status> {
        let req = pb::DeleteGroupRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
        };
        self.conn
            .call(|ch| {
                let req = req.clone();
                async move { client(ch).delete_group(req).await.map(|_| ()) }
            })
            .await
    }

    /// Removes every stored message of the topic, each partition on its
    /// leader. Returns (messages, bytes) purged.
    pub async fn purge_topic(&self, name: &str) -> Result<(u64, u64), Status> {
        let answers = self
            .on_every_partition(name, |p, ch| {
                let req = pb::PurgeTopicRequest {
                    name: name.to_owned(),
                    partitions: vec![p],
                };
                async move { client(ch).purge_topic(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok(answers.iter().fold((0, 0), |(n, b), r| {
            (n + r.purged_messages, b + r.purged_bytes)
        }))
    }

    /// Moves a group to `to` (replay or skip) in every partition, each on
    /// its leader. Returns the position each partition now starts from.
    pub async fn reset_group(
        &self,
        topic: &str,
        group: &str,
        to: pb::StartPosition,
    ) -> Result<Vec<pb::PartitionPosition>, Status> {
        let answers = self
            .on_every_partition(topic, |p, ch| {
                let req = pb::ResetGroupRequest {
                    topic: topic.to_owned(),
                    group: group.to_owned(),
                    to: Some(to.clone()),
                    partitions: vec![p],
                };
                async move { client(ch).reset_group(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        let mut out: Vec<pb::PartitionPosition> =
            answers.into_iter().flat_map(|r| r.positions).collect();
        out.sort_by_key(|p| p.partition);
        Ok(out)
    }

    /// Runs `call(partition, channel)` for every partition of `topic` on
    /// that partition's leader, all at once; the answers in partition order.
    async fn on_every_partition<T, F, Fut>(&self, topic: &str, call: F) -> Result<Vec<T>, Status>
    where
        F: Fn(u32, Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let route = self.route(topic).await?;
        let call = &call;
        let calls = route
            .leaders
            .iter()
            .enumerate()
            .map(
                |(p, slot)| async move { self.conn.call_via(slot, |ch| call(p as u32, ch)).await },
            );
        futures::future::join_all(calls).await.into_iter().collect()
    }

    fn learn(&self, info: &pb::TopicInfo) {
        let mut routes = self.routes.lock();
        let fresh = routes
            .get(&info.name)
            .is_none_or(|r| r.leaders.len() != info.partitions.len());
        if fresh {
            routes.insert(
                info.name.clone(),
                Arc::new(Route {
                    ring: PartitionRing::new(info.partitions.len() as u32),
                    leaders: (0..info.partitions.len()).map(|_| Arc::default()).collect(),
                }),
            );
        }
        let route = &routes[&info.name];
        for p in &info.partitions {
            if !p.leader_addr.is_empty() {
                if let Some(slot) = route.leaders.get(p.partition as usize) {
                    *slot.lock() = Some(p.leader_addr.clone());
                }
            }
        }
    }

    async fn route(&self, topic: &str) -> Result<Arc<Route>, Status> {
        if let Some(r) = self.routes.lock().get(topic) {
            return Ok(r.clone());
        }
        self.describe_topic(topic).await?;
        self.routes
            .lock()
            .get(topic)
            .cloned()
            .ok_or_else(|| Status::internal("no route after describe"))
    }

    /// Produces a batch, split by partition and sent to each partition's
    /// leader concurrently. Results are in the order of `messages`.
    pub async fn produce(
        &self,
        topic: &str,
        mut messages: Vec<pb::Message>,
    ) -> Result<Vec<pb::Produced>, Status> {
        let route = self.route(topic).await?;
        let mut by_partition: BTreeMap<u32, Vec<(usize, pb::Message)>> = BTreeMap::new();
        let mut next_index = 0usize;
        for m in messages.drain(..) {
            // As the server routes: by key, else by message id, else round
            // robin (the receiving leader spreads them over the partitions
            // it leads).
            let p = if !m.key.is_empty() {
                route.ring.partition(&m.key)
            } else if !m.message_id.is_empty() {
                route.ring.partition(m.message_id.as_bytes())
            } else {
                (self.counter.fetch_add(1, Ordering::Relaxed) % route.leaders.len() as u64) as u32
            };
            by_partition
                .entry(p)
                .or_default()
                .push((i_next(&mut next_index), m));
        }
        let total: usize = by_partition.values().map(Vec::len).sum();
        let calls = by_partition.into_iter().map(|(p, items)| {
            let slot = route.leaders[p as usize].clone();
            let topic = topic.to_owned();
            async move {
                let (idx, msgs): (Vec<usize>, Vec<pb::Message>) = items.into_iter().unzip();
                // Key-less, id-less messages were balanced here: pin them.
                let req = pb::ProduceRequest {
                    topic,
                    messages: msgs,
                    partition: Some(p),
                };
                let res = self
                    .conn
                    .call_via(&slot, |ch| {
                        let req = req.clone();
                        async move { client(ch).produce(req).await.map(|r| r.into_inner()) }
                    })
                    .await?;
                Ok::<_, Status>((idx, res.results))
            }
        });
        let mut out = vec![pb::Produced::default(); total];
        for r in futures::future::join_all(calls).await {
            let (idx, results) = r?;
            for (i, res) in idx.into_iter().zip(results) {
                out[i] = res;
            }
        }
        Ok(out)
    }

    /// Receives up to `max` messages for `group`, long-polling up to
    /// `wait_ms` every replica that leads some partition at once, and
    /// returns as soon as any has messages (see [`Inbox`]: messages of
    /// polls that finish later are kept for the next call, their leases
    /// running). Returns an empty list when `wait_ms` passed with nothing.
    pub async fn receive(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        max: u32,
        wait_ms: u32,
    ) -> Result<Vec<pb::ReceivedMessage>, Status> {
        let max = max.max(1) as usize;
        let inbox = self
            .inboxes
            .lock()
            .entry((topic.to_owned(), group.to_owned()))
            .or_default()
            .clone();
        let take = |st: &mut InboxState| -> Vec<pb::ReceivedMessage> {
            let n = st.msgs.len().min(max);
            st.msgs.drain(..n).collect()
        };
        {
            let mut st = inbox.state.lock();
            if !st.msgs.is_empty() {
                return Ok(take(&mut st));
            }
            st.error = None;
        }
        let route = self.route(topic).await?;
        // Partitions by their believed leader; unknown ones go anywhere.
        let mut by_leader: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (p, slot) in route.leaders.iter().enumerate() {
            let addr = slot.lock().clone().unwrap_or_else(|| self.conn.current());
            by_leader.entry(addr).or_default().push(p as u32);
        }
        let share = (max as u32 / by_leader.len() as u32).max(1);
        for (addr, partitions) in by_leader {
            if !inbox.state.lock().polling.insert(addr.clone()) {
                continue; // one poll per leader at a time
            }
            let req = pb::ReceiveRequest {
                topic: topic.to_owned(),
                group: group.to_owned(),
                consumer: consumer.to_owned(),
                max_messages: share,
                wait_ms,
                partitions,
                ..Default::default()
            };
            let (this, inbox, route) = (self.clone(), inbox.clone(), route.clone());
            tokio::spawn(async move {
                let slot = Mutex::new(Some(addr.clone()));
                let res = this
                    .conn
                    .call_via(&slot, |ch| {
                        let req = req.clone();
                        async move { client(ch).receive(req).await.map(|r| r.into_inner()) }
                    })
                    .await;
                let answered = slot.lock().clone();
                {
                    let mut st = inbox.state.lock();
                    st.polling.remove(&addr);
                    match res {
                        Ok(resp) => {
                            if let Some(a) = &resp.assignment {
                                this.learn_assignment(&route, a);
                                // The replica that answered leads what it served.
                                if let Some(addr) = answered {
                                    for p in &a.serving {
                                        if let Some(slot) = route.leaders.get(*p as usize) {
                                            *slot.lock() = Some(addr.clone());
                                        }
                                    }
                                }
                            }
                            st.msgs.extend(resp.messages);
                        }
                        Err(e) => st.error = Some(e),
                    }
                }
                inbox.changed.notify_waiters();
            });
        }
        // Wait for messages, or for every poll to end, or the wait to pass
        // (plus a margin for the polls' own round trips).
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(u64::from(wait_ms))
            + self.conn.options().request_timeout;
        loop {
            let changed = inbox.changed.notified();
            {
                let mut st = inbox.state.lock();
                if !st.msgs.is_empty() {
                    return Ok(take(&mut st));
                }
                if st.polling.is_empty() {
                    return match st.error.take() {
                        Some(e) => Err(e),
                        None => Ok(Vec::new()),
                    };
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    fn learn_assignment(&self, route: &Route, a: &pb::Assignment) {
        for r in &a.elsewhere {
            if let (Some(h), Some(slot)) = (&r.leader, route.leaders.get(r.partition as usize)) {
                if !h.leader_addr.is_empty() {
                    *slot.lock() = Some(h.leader_addr.clone());
                }
            }
        }
    }

    /// Receipts by partition (a receipt starts with its partition).
    fn split(receipts: &[String]) -> BTreeMap<u32, Vec<String>> {
        let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for r in receipts {
            let p = r
                .split(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            out.entry(p).or_default().push(r.clone());
        }
        out
    }

    async fn settle<F, Fut>(
        &self,
        topic: &str,
        receipts: &[String],
        call: F,
    ) -> Result<Vec<pb::ReceiptResult>, Status>
    where
        F: Fn(Channel, Vec<String>) -> Fut + Clone,
        Fut: std::future::Future<Output = Result<Vec<pb::ReceiptResult>, Status>>,
    {
        let route = self.route(topic).await?;
        let calls = Self::split(receipts).into_iter().map(|(p, rs)| {
            let slot = route.leaders.get(p as usize).cloned().unwrap_or_default();
            let call = call.clone();
            async move { self.conn.call_via(&slot, |ch| call(ch, rs.clone())).await }
        });
        let mut by_receipt: HashMap<String, pb::ReceiptResult> = HashMap::new();
        for r in futures::future::join_all(calls).await {
            for res in r? {
                by_receipt.insert(res.receipt.clone(), res);
            }
        }
        Ok(receipts
            .iter()
            .map(|r| {
                by_receipt.remove(r).unwrap_or_else(|| pb::ReceiptResult {
                    receipt: r.clone(),
                    reason: "RECEIPT_NOT_FOUND".into(),
                    message: "no answer for this receipt".into(),
                    ..Default::default()
                })
            })
            .collect())
    }

    pub async fn ack(
        &self,
        topic: &str,
        group: &str,
        receipts: &[String],
    ) -> Result<Vec<pb::ReceiptResult>, Status> {
        let (topic_s, group) = (topic.to_owned(), group.to_owned());
        self.settle(topic, receipts, move |ch, receipts| {
            let req = pb::AckRequest {
                topic: topic_s.clone(),
                group: group.clone(),
                receipts,
            };
            async move { client(ch).ack(req).await.map(|r| r.into_inner().results) }
        })
        .await
    }

    pub async fn nack(
        &self,
        topic: &str,
        group: &str,
        receipts: &[String],
        delay_ms: Option<u64>,
        error: &str,
    ) -> Result<Vec<pb::ReceiptResult>, Status> {
        let (topic_s, group, error) = (topic.to_owned(), group.to_owned(), error.to_owned());
        self.settle(topic, receipts, move |ch, receipts| {
            let req = pb::NackRequest {
                topic: topic_s.clone(),
                group: group.clone(),
                receipts,
                delay_ms,
                error: error.clone(),
            };
            async move { client(ch).nack(req).await.map(|r| r.into_inner().results) }
        })
        .await
    }

    pub async fn extend_lease(
        &self,
        topic: &str,
        group: &str,
        receipts: &[String],
        visibility_ms: u64,
    ) -> Result<Vec<pb::ReceiptResult>, Status> {
        let (topic_s, group) = (topic.to_owned(), group.to_owned());
        self.settle(topic, receipts, move |ch, receipts| {
            let req = pb::ExtendLeaseRequest {
                topic: topic_s.clone(),
                group: group.clone(),
                receipts,
                visibility_ms,
            };
            async move {
                client(ch)
                    .extend_lease(req)
                    .await
                    .map(|r| r.into_inner().results)
            }
        })
        .await
    }
}

/// The next request position.
fn i_next(i: &mut usize) -> usize {
    *i += 1;
    *i - 1
}
