#!/usr/bin/env python3
"""Writes fleetgate.json (the Grafana dashboard) next to this script.

Edit the panels here, run `python3 deploy/grafana/generate.py`, and commit both files;
tests/tests/deploy.rs checks that the committed JSON is what this script writes and that every
metric it names is one the broker exports.
"""
import json
import os
import sys
panels=[]
y=0
pid=1
DS={"type":"prometheus","uid":"${datasource}"}
def row(title):
    global y,pid
    panels.append({"type":"row","title":title,"id":pid,"collapsed":False,"gridPos":{"h":1,"w":24,"x":0,"y":y}}); pid+=1; y+=1
def ts(title, targets, x, w=12, h=8, unit="short", desc="", stack=False):
    global pid
    p={"type":"timeseries","title":title,"id":pid,"description":desc,"datasource":DS,
       "gridPos":{"h":h,"w":w,"x":x,"y":y},
       "fieldConfig":{"defaults":{"unit":unit,"custom":{"stacking":{"mode":"normal" if stack else "none"},"fillOpacity":10}},"overrides":[]},
       "options":{"legend":{"displayMode":"table","placement":"right","calcs":["lastNotNull","max"]},"tooltip":{"mode":"multi"}},
       "targets":[{"refId":chr(65+i),"expr":e,"legendFormat":l,"datasource":DS} for i,(e,l) in enumerate(targets)]}
    panels.append(p); pid+=1
def stat(title, expr, x, w=4, unit="short", thresholds=None, desc=""):
    global pid
    steps=thresholds or [{"color":"green","value":None}]
    panels.append({"type":"stat","title":title,"id":pid,"description":desc,"datasource":DS,
       "gridPos":{"h":4,"w":w,"x":x,"y":y},
       "fieldConfig":{"defaults":{"unit":unit,"thresholds":{"mode":"absolute","steps":steps}},"overrides":[]},
       "options":{"reduceOptions":{"calcs":["lastNotNull"]},"colorMode":"background","graphMode":"none"},
       "targets":[{"refId":"A","expr":expr,"datasource":DS}]}); pid+=1
def sel(extra=""):
    return '{instance=~"$instance"%s}'%(", "+extra if extra else "")
I=sel()
ACC=sel('outcome="accepted"'); REF=sel('outcome="refused"'); SRV=sel('cert="server"')
R="[$__rate_interval]"
row("Overview")
stat("Live sessions", f"sum(fleet_sessions_live{I})", 0)
stat("Admissions /s", f"sum(rate(fleet_handshakes_total{ACC}[5m]))", 4, unit="reqps")
stat("Refusals /s", f"sum(rate(fleet_handshakes_total{REF}[5m]))", 8, unit="reqps",
     thresholds=[{"color":"green","value":None},{"color":"orange","value":1},{"color":"red","value":10}])
stat("Messages in /s", f"sum(rate(fleet_messages_received_total{I}[5m]))", 12, unit="reqps")
stat("CRL expires in", f"min(fleet_crl_next_update_seconds{I})", 16, unit="s",
     thresholds=[{"color":"red","value":None},{"color":"orange","value":3600},{"color":"green","value":21600}])
stat("Server certificate", f"min(fleet_cert_expiry_days{SRV})", 20, unit="d",
     thresholds=[{"color":"red","value":None},{"color":"orange","value":14},{"color":"green","value":30}])
y+=4
row("Admissions")
ts("Admissions and refusals by reason", [
    (f"sum by (reason) (rate(fleet_handshakes_total{REF}{R}))","refused: {{reason}}"),
    (f"sum(rate(fleet_handshakes_total{ACC}{R}))","accepted"),
], 0, unit="reqps", desc="Every TLS handshake and admission by outcome; a refusal's reason is its label (docs/operations.md).")
ts("Refused before the handshake, caps hit", [
    (f"sum by (reason) (rate(fleet_connections_rejected_total{I}{R}))","{{reason}}"),
    (f"sum by (limit) (rate(fleet_limits_total{I}{R}))","cap: {{limit}}"),
], 12, unit="reqps", desc="Connections closed at accept (per-source cap, max_connections, PROXY header) and caps hit.")
y+=8
row("Sessions")
ts("Sessions and connections", [
    (f"sum by (instance) (fleet_sessions_live{I})","sessions {{instance}}"),
    (f"sum by (instance) (fleet_connections_open{I})","TCP {{instance}}"),
    (f"sum by (instance) (fleet_sessions_parked{I})","parked {{instance}}"),
], 0)
ts("Sessions cut", [
    (f"sum by (reason) (increase(fleet_kicks_total{I}{R}))","{{reason}}"),
    (f"sum by (reason) (increase(fleet_protocol_errors_total{I}{R}))","protocol: {{reason}}"),
    (f"sum by (action) (increase(fleet_acl_denied_total{I}{R}))","acl: {{action}}"),
], 12, desc="Revocations, takeovers, expiry, protocol violations and ACL refusals.")
y+=8
row("Ingest and commands")
ts("Ingest", [
    (f"sum(rate(fleet_messages_received_total{I}{R}))","received"),
    (f"sum(rate(fleet_messages_stored_total{I}{R}))","stored"),
    (f"sum(rate(fleet_messages_delivered_total{I}{R}))","delivered"),
    (f"sum(rate(fleet_messages_dropped_total{I}{R}))","dropped (slow subscriber)"),
    (f"sum(rate(fleet_cluster_sink_rows_total{I}{R}))","SQL sink rows (cluster)"),
], 0, unit="reqps")
ts("Store errors", [
    (f"sum by (instance) (increase(fleet_store_errors_total{I}{R}))","store {{instance}}"),
    (f"sum by (instance) (increase(fleet_cluster_sink_errors_total{I}{R}))","SQL sink {{instance}}"),
], 12, desc="Failed commits: nothing unstored is acknowledged, but devices retransmit.")
y+=8
ts("Commands", [(f"sum by (status) (rate(fleet_commands_total{I}{R}))","{{status}}")], 0, unit="reqps",
   desc="Queued-command status transitions (docs/spec/commands.md).")
ts("Commands pending", [(f"max(fleet_commands_pending{I})","pending")], 12)
y+=8
row("Certificates and revocation")
ts("CRL", [
    (f"min by (instance) (fleet_crl_next_update_seconds{I})","until nextUpdate {{instance}}"),
    (f"max by (instance) (fleet_crl_age_seconds{I})","age {{instance}}"),
], 0, unit="s")
ts("Live devices by certificate expiry", [(f"sum by (within) (fleet_sessions_cert_expiry{I})","within {{within}}")], 12,
   stack=True, desc="Devices to rotate first: the buckets exclude the smaller ones.")
y+=8
ts("Certificates in force (days to expiry)", [(f"min by (cert) (fleet_cert_expiry_days{I})","{{cert}}")], 0, unit="d")
ts("Revocations and CRL reloads", [
    (f"sum(increase(fleet_revocations_seen_total{I}{R}))","revocations seen"),
    (f"sum(increase(fleet_cluster_revocations_received_total{I}{R}))","announced by other nodes"),
    (f"sum by (outcome) (increase(fleet_crl_reloads_total{I}{R}))","reload {{outcome}}"),
], 12)
y+=8
row("Cluster")
ts("NATS connection", [(f"fleet_cluster_connected{I} and fleet_cluster_member{I} == 1","{{instance}}")], 0,
   desc="1 while a member's NATS connection is up; at 0 the member refuses devices.")
ts("Admission cache", [(f"sum by (result) (rate(fleet_admission_cache_total{I}{R}))","{{result}}")], 12, unit="reqps")
dash={
 "__inputs":[{"name":"DS_PROMETHEUS","label":"Prometheus","type":"datasource","pluginId":"prometheus","pluginName":"Prometheus"}],
 "title":"fleetgate","uid":"fleetgate","tags":["fleetgate","mqtt","mtls"],"timezone":"browser","schemaVersion":39,"version":1,
 "refresh":"30s","time":{"from":"now-6h","to":"now"},"editable":True,
 "description":"fleet-broker: admissions and refusals by reason, sessions, ingest, store errors, commands, CRL and certificate expiry. Alerts: deploy/prometheus/alerts.yml.",
 "templating":{"list":[
   {"name":"datasource","type":"datasource","query":"prometheus","label":"Data source","current":{}},
   {"name":"instance","type":"query","label":"Broker","datasource":DS,
    "query":{"query":"label_values(fleet_sessions_live, instance)","refId":"instance"},"definition":"label_values(fleet_sessions_live, instance)",
    "includeAll":True,"multi":True,"allValue":".*","current":{"text":"All","value":"$__all"},"refresh":2}]},
 "annotations":{"list":[]},
 "panels":panels}
text = json.dumps(dash, indent=2) + "\n"
if "--stdout" in sys.argv:
    sys.stdout.write(text)
else:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fleetgate.json"), "w") as f:
        f.write(text)
    print(f"fleetgate.json: {len(panels)} panels")
