package services

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilmesh/veil/agent/datapath"
)

// Stats reads the socket programs' translation counters.
type Stats interface {
	ServiceStats() (datapath.ServiceStats, error)
}

var _ Stats = (*datapath.Datapath)(nil)

var (
	descTranslations = prometheus.NewDesc("veil_service_translations_total",
		"Connects and sends to a Service address: translated to a backend, or refused for want of one.", []string{"result"}, nil)
	descNoBackends = prometheus.NewDesc("veil_services_without_backends",
		"Service addresses (cluster IP, port, protocol) without backends, whose clients are refused.", nil, nil)
	descUnresolved = prometheus.NewDesc("veil_service_ports_unresolved",
		"Service ports without backends although the Service has endpoints (e.g. a target port name no endpoint declares).", nil, nil)
	descMapErrors = prometheus.NewDesc("veil_service_map_write_errors_total",
		"Failed writes of a Service into the node's map, by reason (full: no room for another entry).", []string{"reason"}, nil)
)

// collector exports the Service map's metrics.
type collector struct {
	c     *Controller
	stats Stats
}

// NewCollector exports c's metrics and the datapath's translation counters.
func NewCollector(c *Controller, stats Stats) prometheus.Collector {
	return collector{c: c, stats: stats}
}

func (collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descTranslations, descNoBackends, descUnresolved, descMapErrors} {
		ch <- d
	}
}

func (m collector) Collect(ch chan<- prometheus.Metric) {
	if s, err := m.stats.ServiceStats(); err == nil {
		ch <- prometheus.MustNewConstMetric(descTranslations, prometheus.CounterValue, float64(s.Translated), "translated")
		ch <- prometheus.MustNewConstMetric(descTranslations, prometheus.CounterValue, float64(s.Refused), "refused")
	} else {
		ch <- prometheus.NewInvalidMetric(descTranslations, err)
	}
	ch <- prometheus.MustNewConstMetric(descNoBackends, prometheus.GaugeValue, float64(m.c.WithoutBackends()))
	ch <- prometheus.MustNewConstMetric(descUnresolved, prometheus.GaugeValue, float64(m.c.Problems()))
	full, other := m.c.writeErrors()
	ch <- prometheus.MustNewConstMetric(descMapErrors, prometheus.CounterValue, float64(full), "full")
	ch <- prometheus.MustNewConstMetric(descMapErrors, prometheus.CounterValue, float64(other), "other")
}

// countWriteError counts a failed map write by reason. c.mu is held.
func (c *Controller) countWriteError(err error) {
	if errors.Is(err, datapath.ErrServiceMapFull) {
		c.mapFull++
	} else {
		c.mapOther++
	}
}

func (c *Controller) writeErrors() (full, other uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mapFull, c.mapOther
}
