package cli

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// versionInfo is the output of meshctl version.
type versionInfo struct {
	Version   string `json:"version"`
	Revision  string `json:"revision,omitempty"`
	GoVersion string `json:"goVersion"`
	Platform  string `json:"platform"`
}

// buildVersion reads the version from the binary's build information: the
// module version when built with `go install …@version`, the VCS revision
// when built from a checkout with VCS stamping.
func buildVersion() versionInfo {
	v := versionInfo{Version: "dev", GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if mv := bi.Main.Version; mv != "" && mv != "(devel)" {
		v.Version = mv
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			v.Revision = s.Value
		}
	}
	return v
}

func newVersionCommand() *cobra.Command {
	var out outputFlag
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print meshctl's version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.check(); err != nil {
				return err
			}
			v := buildVersion()
			w := cmd.OutOrStdout()
			done, err := out.structured(w, v)
			if err != nil || done {
				return err
			}
			rev := ""
			if v.Revision != "" {
				rev = " " + v.Revision
			}
			_, err = fmt.Fprintf(w, "meshctl %s%s (%s, %s)\n", v.Version, rev, v.GoVersion, v.Platform)
			return err
		},
	}
	addOutputFlag(cmd, &out)
	return cmd
}
