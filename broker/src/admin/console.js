// The operator console over the JSON API. Every value from an answer is set as text
// (`h()` makes text nodes, attributes are set with setAttribute): values come from the registry
// and from other nodes' answers over the cluster bus, and are never parsed as HTML. The page's
// CSP allows no inline script or handler (script-src 'self').
"use strict";
const $ = (s, el = document) => el.querySelector(s);
const when = (s) => s == null ? "" : new Date(s * 1000).toISOString().replace("T", " ").slice(0, 19);

// An element: `props` are attributes (strings), `class`, `data-*`; children are elements or text.
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v != null && v !== false) el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const show = (...sections) => $("#view").replaceChildren(...sections);
// Refusal reason -> one-line explanation, from the summary (`refusal_reasons`).
let reasons = {};
const why = (r) => reasons[r] || "";
// The header names the organisation (the API's `organisation`), as text.
function header(s) {
  reasons = s.refusal_reasons;
  if (s.organisation) {
    $("#org").textContent = s.organisation;
    document.title = s.organisation + " · fleetgate console";
  }
}
const ago = (ms) => {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : when(ms / 1000);
};
// Last seen: now when online, else when its last session ended (if a node remembers).
const lastSeen = (online, ms) => online ? "now" : ms == null ? "not since the broker started" : ago(ms);
const rate = (r) => r == null ? "–" : `${r}/min`;
const deviceLink = (id) => h("a", { href: "#/device/" + encodeURIComponent(id) }, id);

// Every state-changing call is JSON with the request header (docs/spec/admin-api.md).
async function api(path, opts) {
  const r = await fetch("/api/v1/" + path, opts);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.status);
  return body;
}
function fail(e) { show(h("section", { class: "wide bad", id: "error" }, String(e.message))); }

function card(value, label, props) {
  return h("div", { class: "card" }, h("b", props || {}, value), h("span", {}, label));
}

async function overview() {
  const s = await api("summary?expiring_within_days=30");
  header(s);
  const refused = Object.entries(s.refused).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
  const max = Math.max(1, ...refused.map(([, n]) => n));
  const log = s.issuance_log;
  const bars = refused.length ? refused.map(([r, n]) => {
    const bar = h("i");
    bar.style.width = Math.round(60 * n / max) + "%";
    return [h("div", { class: "bar", "data-reason": r }, h("span", {}, r), bar, n), h("p", { class: "why" }, why(r))];
  }) : [h("p", { class: "muted" }, "none")];
  const health = s.crl_health;
  const crl = h("dd", { id: "crl-health", class: health.ok ? "ok" : "bad" },
    s.crl ? `#${s.crl.number}, ${Math.round(s.crl.age_seconds / 3600)} h old, ` +
      (s.crl.expired ? "expired" : "next update in " + Math.round(s.crl.next_update_seconds / 3600) + " h") + "; "
      : "none loaded; ",
    health.message,
    health.first_missing.length ? h("span", { class: "why" }, " missing: ", health.first_missing.map((m) => m.device).join(", ")) : null);
  const glossary = h("details", { id: "reasons" }, h("summary", {}, "What each refusal reason means"),
    h("dl", {}, Object.entries(s.refusal_reasons).map(([r, text]) => [h("dt", {}, r), h("dd", { "data-reason": r }, text)])));
  const expiring = s.expiring.first.length
    ? s.expiring.first.map((e) => h("tr", {}, h("td", {}, deviceLink(e.device)), h("td", {}, when(e.not_after))))
    : [h("tr", {}, h("td", { colspan: 2, class: "muted" }, "none"))];
  show(
    h("section", { class: "wide", id: "overview" },
      h("h2", {}, "Fleet of ", s.organisation || "this broker", " ", h("span", { class: "muted" }, "served by ", s.node)),
      h("div", { class: "cards" },
      card(s.devices.active, "active devices", { id: "count-active" }),
      card(s.devices.revoked, "revoked"),
      card(s.sessions_live, "live sessions", { id: "sessions-live" }),
      card(s.admitted, `admitted, ${s.window_minutes} min`),
      card(refused.reduce((a, [, n]) => a + n, 0), `refused, ${s.window_minutes} min`),
      card(s.expiring.count, `certs expiring in ${s.expiring.within_days} d`, { class: s.expiring.count ? "bad" : "ok" }))),
    h("section", {}, h("h2", {}, `Refusals by reason (${s.window_minutes} min)`), h("div", { id: "refusals" }, bars), glossary),
    h("section", {}, h("h2", {}, "Health"), h("dl", {},
      h("dt", {}, "CRL"), crl,
      h("dt", {}, "Issuance log"),
      h("dd", { class: log.ok ? "ok" : "bad" }, log.ok ? `verified, ${log.entries} entries` : (log.error || log.disagreements + " disagreements")))),
    h("section", {}, h("h2", {}, "Expiring certificates"),
      h("table", {}, h("tr", {}, h("th", {}, "Device"), h("th", {}, "notAfter")), expiring)));
}

async function devices(params) {
  const q = new URLSearchParams(params);
  const page = await api("devices?" + q);
  const status = q.get("status");
  const search = h("form", { class: "search", id: "search" },
    h("input", { name: "prefix", placeholder: "id starts with", "aria-label": "id prefix" }),
    h("select", { name: "status", "aria-label": "status" },
      h("option", { value: "" }, "any status"),
      h("option", { selected: status === "active" }, "active"),
      h("option", { selected: status === "revoked" }, "revoked")),
    h("button", {}, "Search"));
  search.elements.prefix.value = q.get("prefix") || "";
  search.addEventListener("submit", (ev) => {
    ev.preventDefault();
    location.hash = "#/devices?" + new URLSearchParams(new FormData(ev.target));
  });
  const rows = page.devices.map((d) => h("tr", {},
    h("td", {}, deviceLink(d.device)),
    h("td", { class: d.status === "active" ? "ok" : "bad" }, d.status),
    h("td", { class: d.online ? "ok" : "muted", "data-col": "online" }, d.online ? "online" : "offline"),
    h("td", { "data-col": "last-seen" }, lastSeen(d.online, d.last_seen_ms)),
    h("td", { "data-col": "rate" }, rate(d.messages_per_minute)),
    h("td", { "data-col": "commands" }, d.open_commands),
    h("td", {}, when(d.not_after))));
  const next = page.next
    ? h("p", {}, h("a", { id: "next", href: "#/devices?" + new URLSearchParams({ ...Object.fromEntries(q), after: page.next }) }, "next page"))
    : null;
  show(h("section", { class: "wide" }, h("h2", {}, "Devices"), search,
    h("table", { id: "devices" },
      h("tr", {}, h("th", {}, "Device"), h("th", {}, "Status"), h("th", {}, "Online"), h("th", {}, "Last seen"),
        h("th", {}, "Messages"), h("th", {}, "Open commands"), h("th", {}, "Certificate until")),
      rows),
    next));
}

async function device(id) {
  const d = await api("devices/" + encodeURIComponent(id));
  const s = d.session;
  const refusals = d.last_refusals.length
    ? h("ul", { id: "last-refusals" }, d.last_refusals.map((r) => h("li", {}, h("b", {}, r), " ", h("span", { class: "why" }, why(r)))))
    : h("span", { class: "muted" }, "none");
  const commands = d.commands.length
    ? d.commands.map((c) => h("tr", {}, h("td", {}, c.name), h("td", {}, c.status), h("td", {}, when(c.created_at_ms / 1000)), h("td", {}, c.sender)))
    : [h("tr", {}, h("td", { colspan: 4, class: "muted" }, "none"))];
  const certs = d.certificates.map((c) => h("tr", {},
    h("td", {}, c.serial),
    h("td", {}, c.status, c.revocation_reason ? ` (${c.revocation_reason})` : ""),
    h("td", {}, when(c.not_after)),
    h("td", {}, c.key_source)));
  const revoke = d.status === "active" ? h("p", {}, h("button", { class: "danger", id: "revoke" }, "Revoke…")) : null;
  if (revoke) {
    revoke.firstChild.addEventListener("click", () => {
      $("#confirm-id").textContent = d.device;
      $("#confirm").showModal();
    });
  }
  show(h("section", { class: "wide", id: "device", "data-device": d.device },
    h("h2", {}, d.device, " ", h("span", { id: "device-status", class: d.status === "active" ? "ok" : "bad" }, d.status)),
    h("dl", {},
      h("dt", {}, "Session"),
      h("dd", { id: "session" }, s ? `online since ${when(s.since_ms / 1000)} from ${s.peer}, ${s.received} in / ${s.sent} out` : "offline"),
      h("dt", {}, "Last seen"), h("dd", { id: "last-seen" }, lastSeen(!!s, d.last_seen_ms)),
      h("dt", {}, "Messages"), h("dd", { id: "rate" }, rate(d.messages_per_minute)),
      h("dt", {}, "Last refusals"), h("dd", {}, refusals)),
    revoke,
    h("h2", {}, "Commands"),
    h("table", { id: "commands" }, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Status"), h("th", {}, "Sent"), h("th", {}, "By")), commands),
    h("h2", {}, "Certificates"),
    h("table", {}, h("tr", {}, h("th", {}, "Serial"), h("th", {}, "Status"), h("th", {}, "notAfter"), h("th", {}, "Key")), certs)));
}

// Firmware campaigns (docs/spec/ota.md): read-only; campaigns are started at the station.
const pct = (bp) => `${Math.floor(bp / 100)}.${String(bp % 100).padStart(2, "0")}%`;
const counts = (c) => Object.entries(c.counts).map(([s, n]) => `${s} ${n}`).join(", ");
const campaignLink = (id) => h("a", { href: "#/update/" + encodeURIComponent(id) }, id);
const stateClass = (s) => s === "confirmed" || s === "completed" ? "ok"
  : s === "failed" || s === "rolled_back" || s === "aborted" ? "bad" : "";

async function updates() {
  const page = await api("ota/campaigns");
  const rows = page.campaigns.length
    ? page.campaigns.map((c) => h("tr", {},
      h("td", {}, campaignLink(c.id)),
      h("td", {}, `${c.board} ${c.version}`),
      h("td", { class: stateClass(c.state), "data-col": "state" }, c.state),
      h("td", {}, `${c.wave + 1} of ${c.waves.length} (${c.waves.map((w) => w + "%").join(", ")})`),
      h("td", {}, pct(c.abort_if_failed_bp)),
      h("td", { "data-col": "counts" }, `${c.jobs}: ${counts(c)}`),
      h("td", {}, when(c.created_at_ms / 1000))))
    : [h("tr", {}, h("td", { colspan: 7, class: "muted" }, "no campaigns: fleet-provision ota start"))];
  show(h("section", { class: "wide" }, h("h2", {}, "Firmware updates"),
    h("table", { id: "campaigns" },
      h("tr", {}, h("th", {}, "Campaign"), h("th", {}, "Release"), h("th", {}, "State"), h("th", {}, "Wave"),
        h("th", {}, "Stops past"), h("th", {}, "Jobs"), h("th", {}, "Started")),
      rows)));
}

async function update(id) {
  const d = await api("ota/campaigns/" + encodeURIComponent(id));
  const c = d.campaign;
  const jobs = d.jobs.map((j) => h("tr", {},
    h("td", {}, deviceLink(j.device)),
    h("td", {}, j.wave + 1),
    h("td", { class: stateClass(j.state), "data-col": "state" }, j.state, j.reason ? ` (${j.reason})` : ""),
    h("td", {}, j.state === "downloading" && j.size > 0 ? `${Math.floor(j.offset * 100 / j.size)}%` : ""),
    h("td", {}, when(j.updated_at_ms / 1000))));
  show(h("section", { class: "wide", id: "campaign", "data-campaign": c.id },
    h("h2", {}, c.id, " ", h("span", { id: "campaign-state", class: stateClass(c.state) }, c.state)),
    h("dl", {},
      h("dt", {}, "Release"), h("dd", {}, `${c.board} ${c.version} (tag ${c.release})`),
      h("dt", {}, "Devices"), h("dd", {}, c.devices),
      h("dt", {}, "Waves"), h("dd", {}, `${c.wave + 1} of ${c.waves.length} offered (${c.waves.map((w) => w + "%").join(", ")})`),
      h("dt", {}, "Stops past"), h("dd", {}, `${pct(c.abort_if_failed_bp)} failed`),
      h("dt", {}, "Stopped"), h("dd", { id: "campaign-reason" }, c.reason || "–"),
      h("dt", {}, "Jobs"), h("dd", {}, `${c.jobs}: ${counts(c)}`)),
    h("table", { id: "jobs" },
      h("tr", {}, h("th", {}, "Device"), h("th", {}, "Wave"), h("th", {}, "State"), h("th", {}, "Progress"), h("th", {}, "Updated")),
      jobs)));
}

$("#confirm").addEventListener("close", async () => {
  if ($("#confirm").returnValue !== "revoke") return;
  const id = $("#confirm-id").textContent;
  try {
    await api(`devices/${encodeURIComponent(id)}/revoke`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-fleetgate-request": "1" },
      body: JSON.stringify({ reason: $("#confirm-reason").value }),
    });
    await device(id);
  } catch (e) { fail(e); }
});

function route() {
  const hash = location.hash.slice(1) || "/";
  const [path, query] = hash.split("?");
  const p = path.startsWith("/device/") ? device(decodeURIComponent(path.slice(8)))
    : path.startsWith("/update/") ? update(decodeURIComponent(path.slice(8)))
    : path === "/updates" ? updates()
    : path === "/devices" ? devices(query || "") : overview();
  p.catch(fail);
}
window.addEventListener("hashchange", route);
// The header and the reasons' explanations, whichever page opens first.
api("summary").then(header).catch(() => {}).finally(route);

function feed() {
  const es = new EventSource("/api/v1/events");
  es.onopen = () => { $("#feed-state").textContent = "(connected)"; };
  es.onerror = () => { $("#feed-state").textContent = "(reconnecting)"; };
  for (const kind of ["admitted", "refused", "closed"]) {
    es.addEventListener(kind, (m) => {
      const e = JSON.parse(m.data);
      const row = document.createElement("div");
      row.className = kind === "admitted" ? "ok" : kind === "refused" ? "bad" : "";
      row.dataset.kind = kind; row.dataset.device = e.device || "";
      row.textContent = `${new Date(e.at_ms).toISOString().slice(11, 19)} ${kind} ${e.reason} ${e.device || "-"} ${e.peer}`;
      if (kind === "refused") row.title = why(e.reason);
      $("#feed").prepend(row);
      while ($("#feed").children.length > 200) $("#feed").lastChild.remove();
      const open = $("#device");
      if (open && open.dataset.device === e.device && kind !== "refused") device(e.device).catch(fail);
    });
  }
}
feed();
