// Package chart renders and lints Veil's Helm chart (deploy/helm/veil) with
// the Helm SDK, so that the chart is tested, and the plain manifests in
// deploy/manifests are generated from it, without a helm binary.
//
//	files, err := chart.Render("deploy/helm/veil", "veil-system", map[string]any{
//		"encryption": map[string]any{"strictMode": true},
//	})
//
// Render and Lint are safe for concurrent use.
package chart

import (
	"errors"
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
)

// ReleaseName is the release name charts are rendered with; Veil's objects
// have fixed names, so it only shows in .Release.Name.
const ReleaseName = "veil"

// File is one rendered template.
type File struct {
	// Name is the template's file name, e.g. "05-daemonset.yaml".
	Name string
	// Content is the rendered YAML; never only whitespace.
	Content string
}

// Render renders the chart in dir as `helm template` would for a release in
// namespace, with values merged over the chart's values.yaml and validated
// against its values.schema.json. Templates that render to nothing are left
// out; the rest come sorted by name. A `fail` in a template is an error
// that carries its message.
func Render(dir, namespace string, values map[string]any) ([]File, error) {
	ch, err := loader.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("load chart %s: %w", dir, err)
	}
	vals, err := chartutil.ToRenderValues(ch, values, chartutil.ReleaseOptions{
		Name:      ReleaseName,
		Namespace: namespace,
		Revision:  1,
		IsInstall: true,
	}, chartutil.DefaultCapabilities)
	if err != nil {
		return nil, fmt.Errorf("values of chart %s: %w", dir, err)
	}
	out, err := engine.Render(ch, vals)
	if err != nil {
		return nil, fmt.Errorf("render chart %s: %w", dir, err)
	}
	var files []File
	for _, name := range slices.Sorted(maps.Keys(out)) {
		base := path.Base(name)
		if !strings.HasSuffix(base, ".yaml") || strings.HasPrefix(base, "_") {
			continue
		}
		if strings.TrimSpace(out[name]) == "" {
			continue
		}
		files = append(files, File{Name: base, Content: out[name]})
	}
	return files, nil
}

// Lint runs `helm lint` on the chart in dir with values and returns an error
// that lists every finding of warning severity or worse.
func Lint(dir, namespace string, values map[string]any) error {
	l := lint.All(dir, values, namespace, false)
	var errs []error
	for _, m := range l.Messages {
		if m.Severity >= support.WarningSev {
			errs = append(errs, m)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("lint chart %s: %w", dir, err)
	}
	return nil
}
