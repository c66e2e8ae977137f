package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/veilmesh/veil/api/nodeinfo"
	"github.com/veilmesh/veil/policy"
)

// agentMetrics are the agent's Prometheus metrics. Datapath counters are read
// from the maps at scrape time, so they are exact and cost nothing between
// scrapes.
type agentMetrics struct {
	reg       *prometheus.Registry
	reconcile prometheus.Histogram
	verdicts  *prometheus.CounterVec
}

func newAgentMetrics(d *Daemon) *agentMetrics {
	m := &agentMetrics{
		reg: prometheus.NewRegistry(),
		reconcile: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "veil", Name: "reconcile_duration_seconds",
			Help:    "Time to converge one changed object into the datapath.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		verdicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "veil", Name: "policy_verdicts_total",
			Help: "Flow verdicts reported by the datapath (new flows and drops).",
		}, []string{"verdict"}),
	}
	m.reg.MustRegister(m.reconcile, m.verdicts, collector{d}, prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

type collector struct{ d *Daemon }

var (
	descEndpoints  = prometheus.NewDesc("veil_endpoints", "Local endpoints.", nil, nil)
	descIdentities = prometheus.NewDesc("veil_identities", "Identities known to the agent.", nil, nil)
	descEntries    = prometheus.NewDesc("veil_policy_entries", "Policy map entries of local endpoints.", nil, nil)
	descForwarded  = prometheus.NewDesc("veil_forwarded_packets_total", "Packets forwarded by the datapath, by path.", []string{"path"}, nil)
	descDropped    = prometheus.NewDesc("veil_dropped_packets_total", "Packets dropped by the datapath, by reason.", []string{"reason"}, nil)
	descSockmap    = prometheus.NewDesc("veil_sockmap_redirected_bytes_total", "Bytes moved socket to socket by sk_msg.", nil, nil)
	descAccel      = prometheus.NewDesc("veil_accelerated_sockets", "Sockets whose payload sk_msg redirects socket to socket (neither revoked nor fallen back to TCP).", nil, nil)
	descAccelOn    = prometheus.NewDesc("veil_socket_acceleration_enabled", "1 when pods' sockets are accelerated; 0 when not configured or turned off (see status for why).", nil, nil)
	descEventsLost = prometheus.NewDesc("veil_flow_events_lost_total", "Flow events lost because the ring buffer was full.", nil, nil)
	descMapUse     = prometheus.NewDesc("veil_map_entries", "Entries in a datapath map (map pressure).", []string{"map"}, nil)
	descMapCap     = prometheus.NewDesc("veil_map_capacity", "Entries a datapath map can hold (--<map>-max-entries).", []string{"map"}, nil)
	descMapFill    = prometheus.NewDesc("veil_map_fill_ratio", "Entries over capacity of a datapath map; the agent warns from 0.9.", []string{"map"}, nil)
	descMapFull    = prometheus.NewDesc("veil_map_full_errors_total", "Writes a datapath map refused because it was full.", []string{"map"}, nil)
	descAPI        = prometheus.NewDesc("veil_api_server_connected", "1 when the API server answers.", nil, nil)
	descConflicts  = prometheus.NewDesc("veil_node_claim_conflicts",
		"Claims this agent refuses a node because another node (owner; empty: the cluster CIDR) holds them, by kind (pod CIDR, address, endpoint, public key); 1 while the conflict lasts.",
		[]string{"node", "owner", "kind", "claim"}, nil)
)

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descEndpoints, descIdentities, descEntries, descForwarded, descDropped, descSockmap, descAccel, descAccelOn, descEventsLost, descMapUse, descMapCap, descMapFill, descMapFull, descAPI, descConflicts} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	gauge := func(desc *prometheus.Desc, v float64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v, lv...)
	}
	counter := func(desc *prometheus.Desc, v float64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, v, lv...)
	}
	nLocal := d.endpoints.Len()
	var nIPCache int
	var conflicts []nodeinfo.Conflict
	if d.policy != nil {
		nIPCache, conflicts = d.policy.IPCacheSize(), d.policy.Conflicts()
	}
	for _, c := range conflicts {
		gauge(descConflicts, 1, c.Node, c.Owner, c.Kind, c.Claim)
	}
	gauge(descEndpoints, float64(nLocal))
	gauge(descMapUse, float64(nIPCache), "ipcache")
	api := 0.0
	if d.apiUp.Load() {
		api = 1
	}
	gauge(descAPI, api)
	if d.compiler != nil {
		gauge(descIdentities, float64(len(d.compiler.Identities())))
		entries := 0
		for _, ep := range d.localCompiled() {
			entries += len(ep.Entries)
		}
		gauge(descEntries, float64(entries))
		gauge(descMapUse, float64(len(d.compiler.CIDRTable())), "cidrs")
	}
	if d.dp == nil {
		return
	}
	if cs, err := d.dp.Counters(); err == nil {
		counter(descForwarded, float64(cs.Local.Packets), "local")
		counter(descForwarded, float64(cs.Remote.Packets), "remote")
		counter(descForwarded, float64(cs.Stack.Packets), "stack")
		counter(descForwarded, float64(cs.Established.Packets), "established")
		for reason, v := range cs.Drops {
			counter(descDropped, float64(v.Packets), reason.String())
		}
		counter(descSockmap, float64(cs.SocketRedirected.Bytes))
		counter(descEventsLost, float64(cs.EventsLost))
	}
	if n, err := d.dp.AcceleratedSockets(); err == nil {
		gauge(descAccel, float64(n))
	}
	accelOn := 0.0
	if on, _ := d.dp.Acceleration(); on {
		accelOn = 1
	}
	gauge(descAccelOn, accelOn)
	if flows, err := d.dp.Flows(); err == nil {
		gauge(descMapUse, float64(len(flows)), "conntrack")
	}
	if us, err := d.dp.MapUsage(); err == nil {
		for _, u := range us {
			gauge(descMapCap, float64(u.Capacity), u.Map)
			gauge(descMapFill, u.Fill(), u.Map)
			counter(descMapFull, float64(u.FullErrors), u.Map)
		}
	}
}

// serveMetrics serves /metrics, /healthz and /readyz.
func (d *Daemon) serveMetrics() (stop func(), err error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		// Alive while the datapath is loaded: restarting the agent would
		// not fix an unreachable API server.
		if d.dp == nil {
			http.Error(w, "datapath not loaded", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if !d.endpoints.Converged() {
			http.Error(w, "not converged with the API server yet", http.StatusServiceUnavailable)
			return
		}
		if failed := d.degraded.failedClosed(); len(failed) > 0 {
			http.Error(w, strings.Join(failed, "\n"), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
		// Ready, but say what works worse than it should (e.g. socket
		// acceleration turned off by its self-test).
		for k, v := range d.degraded.All() {
			fmt.Fprintf(w, "degraded %s: %s\n", k, v)
		}
	})
	ln, err := net.Listen("tcp", d.cfg.MetricsAddr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s: %w", d.cfg.MetricsAddr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics server stopped", "error", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

// localCompiled returns the compiled endpoints of this node's pods.
func (d *Daemon) localCompiled() []policy.Endpoint {
	var out []policy.Endpoint
	for _, local := range d.endpoints.List() {
		if ep, ok := d.compiler.Endpoint(local.Pod); ok {
			out = append(out, ep)
		}
	}
	return out
}
