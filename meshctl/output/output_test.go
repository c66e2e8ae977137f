package output

import (
	"testing"
	"time"
)

func TestShortDuration(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for d, want := range map[time.Duration]string{
		0: "0s", 42 * time.Second: "42s", 5 * time.Minute: "5m", 5*time.Minute + 10*time.Second: "5m10s",
		3*time.Hour + 4*time.Minute + 5*time.Second: "3h4m", 2 * time.Hour: "2h", 90 * 24 * time.Hour: "90d", 12*24*time.Hour + 3*time.Hour: "12d3h",
	} {
		if got := ShortDuration(d); got != want {
			t.Errorf("ShortDuration(%s) = %q; want %q", d, got, want)
		}
	}
	if got := Age(now, now.Add(time.Hour)); got != "0s" {
		t.Errorf("age of a future time = %q; want 0s", got)
	}
}
