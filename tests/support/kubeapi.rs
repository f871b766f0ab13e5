//! A fake Kubernetes API server: the pods list-watch protocol over HTTP/1.1,
//! enough for kube-rs's watcher and no more.
//!
//! - `GET /api/v1/pods?fieldSelector=spec.nodeName=X` lists (a `PodList` with
//!   `metadata.resourceVersion`; items as the API returns them, without
//!   `kind`/`apiVersion`).
//! - `…&watch=true&resourceVersion=N` streams, chunked, the events after `N`
//!   (`ADDED`/`MODIFIED`/`DELETED`, and a `BOOKMARK` every second), until
//!   `timeoutSeconds` or [`FakeApi::drop_watches`]. A version older than the
//!   compaction point ([`FakeApi::compact`]) gets a `410 Gone` ERROR event,
//!   which makes the client list again.
//! - [`FakeApi::outage`] closes every connection without an answer and cuts
//!   watches.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[derive(Default)]
struct State {
    /// uid → pod object.
    pods: BTreeMap<String, Value>,
    rv: u64,
    /// (resourceVersion, type, object), oldest first.
    events: Vec<(u64, &'static str, Value)>,
    /// Watches from a version before this get 410 Gone.
    compacted: u64,
    down: bool,
    /// Bumped to make every open watch end abruptly.
    cut: u64,
    /// Request lines received ("GET /api/v1/pods?...").
    requests: Vec<String>,
}

pub struct FakeApi {
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl FakeApi {
    pub fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        state.0.lock().unwrap().rv = 1000;
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, st));
            }
        });
        FakeApi { port, state, stop }
    }

    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: agent\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\n",
                self.port
            ),
        )
        .unwrap();
        path
    }

    fn change(&self, f: impl FnOnce(&mut State)) {
        let (m, cv) = &*self.state;
        f(&mut m.lock().unwrap());
        cv.notify_all();
    }

    fn record(s: &mut State, kind: &'static str, mut pod: Value) -> Value {
        s.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.events.push((s.rv, kind, pod.clone()));
        pod
    }

    /// Creates or replaces a pod (ADDED or MODIFIED).
    pub fn put(&self, pod: Value) {
        self.change(|s| {
            let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
            let kind = if s.pods.contains_key(&uid) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let pod = Self::record(s, kind, pod);
            s.pods.insert(uid, pod);
        });
    }

    pub fn delete(&self, uid: &str) {
        self.change(|s| {
            if let Some(pod) = s.pods.remove(uid) {
                Self::record(s, "DELETED", pod);
            }
        });
    }

    /// Forgets the event history: watches from an older version get 410.
    pub fn compact(&self) {
        self.change(|s| {
            s.compacted = s.rv + 1;
            s.events.clear();
        });
    }

    /// Ends every open watch connection abruptly.
    pub fn drop_watches(&self) {
        self.change(|s| s.cut += 1);
    }

    /// The API closes every connection unanswered (and open watches end) until
    /// [`FakeApi::restore`].
    pub fn outage(&self) {
        self.change(|s| {
            s.down = true;
            s.cut += 1;
        });
    }

    pub fn restore(&self) {
        self.change(|s| s.down = false);
    }

    /// Request lines received so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.outage();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn query(target: &str) -> BTreeMap<String, String> {
    let q = target.split_once('?').map_or("", |(_, q)| q);
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), unescape(v)))
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn on_node(pod: &Value, selector: Option<&String>) -> bool {
    match selector.and_then(|s| s.strip_prefix("spec.nodeName=")) {
        Some(node) => pod["spec"]["nodeName"] == node,
        None => true,
    }
}

fn serve(conn: TcpStream, state: Arc<(Mutex<State>, Condvar)>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        let _ = reader.read_exact(&mut body);
        let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let (m, cv) = &*state;
        let down = {
            let mut s = m.lock().unwrap();
            s.requests.push(line.trim().to_owned());
            s.down
        };
        if down {
            // As an API server that died behind its load balancer: the
            // connection closes without an answer.
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        let path = target.split('?').next().unwrap_or("");
        if path != "/api/v1/pods" {
            let _ = respond(&mut conn, 404, &status(404, "NotFound", "not found"));
            continue;
        }
        let q = query(&target);
        let selector = q.get("fieldSelector");
        if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290u64);
            let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            watch(&mut conn, m, cv, from, timeout, bookmarks, selector);
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        let (items, rv) = {
            let s = m.lock().unwrap();
            let items: Vec<Value> = s
                .pods
                .values()
                .filter(|p| on_node(p, selector))
                .cloned()
                .collect();
            (items, s.rv)
        };
        let list = json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        if respond(&mut conn, 200, &list).is_err() {
            return;
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(conn: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        conn,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

fn chunk(conn: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
    conn.flush()
}

#[allow(clippy::too_many_arguments)]
fn watch(
    conn: &mut TcpStream,
    m: &Mutex<State>,
    cv: &Condvar,
    from: u64,
    timeout: u64,
    bookmarks: bool,
    selector: Option<&String>,
) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let end = Instant::now() + Duration::from_secs(timeout);
    let mut sent = from;
    let mut s = m.lock().unwrap();
    if from < s.compacted {
        let e = json!({"type": "ERROR", "object": status(410, "Expired",
            &format!("too old resource version: {from} ({})", s.compacted))});
        drop(s);
        let _ = chunk(conn, &e);
        let _ = conn.write_all(b"0\r\n\r\n");
        return;
    }
    let cut = s.cut;
    let mut last_bookmark = Instant::now();
    loop {
        if s.cut != cut || s.down {
            return; // abrupt: no final chunk
        }
        let pending: Vec<Value> = s
            .events
            .iter()
            .filter(|(rv, _, pod)| *rv > sent && on_node(pod, selector))
            .map(|(_, kind, pod)| json!({"type": kind, "object": pod}))
            .collect();
        let rv = s.rv;
        drop(s);
        for e in &pending {
            if chunk(conn, e).is_err() {
                return;
            }
        }
        sent = rv;
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            let b = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": rv.to_string()}}});
            if chunk(conn, &b).is_err() {
                return;
            }
            last_bookmark = Instant::now();
        }
        if Instant::now() >= end {
            let _ = conn.write_all(b"0\r\n\r\n");
            return;
        }
        s = m.lock().unwrap();
        if s.rv == sent && s.cut == cut && !s.down {
            s = cv.wait_timeout(s, Duration::from_millis(250)).unwrap().0;
        }
    }
}

/// A container: (name, image, runtime id, env as (name, value)).
pub type ContainerSpec<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>);

/// A pod object as the API server returns it.
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub labels: Value,
    pub annotations: Value,
    pub containers: Vec<ContainerSpec<'a>>,
    /// Controller owner (kind, name).
    pub owner: Option<(&'a str, &'a str)>,
}

pub fn pod(p: &PodSpec<'_>) -> Value {
    let containers: Vec<Value> = p
        .containers
        .iter()
        .map(|(name, image, _, env)| {
            json!({
                "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
                "env": env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
                "resources": {}, "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]
            })
        })
        .collect();
    let statuses: Vec<Value> = p
        .containers
        .iter()
        .map(|(name, image, id, _)| {
            json!({
                "name": name, "image": image, "imageID": format!("docker.io/library/{image}@sha256:00"),
                "containerID": format!("containerd://{id}"), "ready": true, "restartCount": 0,
                "started": true, "state": {"running": {"startedAt": "2026-11-25T10:00:01Z"}}
            })
        })
        .collect();
    let owners: Vec<Value> = p
        .owner
        .iter()
        .map(|(kind, name)| {
            json!({"apiVersion": "apps/v1", "kind": kind, "name": name,
                   "uid": "7f0c1c2e-0000-4000-8000-00000000abcd", "controller": true, "blockOwnerDeletion": true})
        })
        .collect();
    json!({
        "metadata": {
            "name": p.name, "namespace": p.namespace, "uid": p.uid,
            "resourceVersion": "1", "creationTimestamp": "2026-11-25T10:00:00Z",
            "labels": p.labels, "annotations": p.annotations, "ownerReferences": owners,
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-11-25T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
            "containers": containers, "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "nodeName": p.node, "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running", "hostIP": "10.0.0.5", "podIP": "10.244.1.7", "qosClass": "BestEffort",
            "startTime": "2026-11-25T10:00:00Z", "containerStatuses": statuses,
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-25T10:00:02Z"}]
        }
    })
}
