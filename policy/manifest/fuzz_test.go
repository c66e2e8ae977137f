package manifest

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the loader: it must neither panic nor
// hang, must file every problem under the file it read, and must be able to
// locate any field of any object it kept.
func FuzzParse(f *testing.F) {
	for _, pattern := range []string{"testdata/*.yaml", "testdata/dir/*.yaml", "testdata/dir/sub/*", "../../meshctl/testdata/*/*"} {
		files, err := filepath.Glob(pattern)
		if err != nil {
			f.Fatal(err)
		}
		for _, name := range files {
			data, err := os.ReadFile(name)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(data)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := Parse("fuzz.yaml", data)
		for _, p := range s.Problems {
			if p.File != "fuzz.yaml" {
				t.Errorf("problem %v does not name the file", p)
			}
			if p.Message == "" {
				t.Errorf("problem %+v has no message", p)
			}
		}
		for ref := range s.origins {
			for _, fieldPath := range []string{"", "metadata.name", "spec.ingress[0].from[0]", "spec[x].y[", "items[9999]"} {
				if p := s.Problem(SeverityError, ref, fieldPath, "m"); p.File != "fuzz.yaml" {
					t.Errorf("Problem(%v) = %+v; want it in fuzz.yaml", ref, p)
				}
			}
		}
	})
}
