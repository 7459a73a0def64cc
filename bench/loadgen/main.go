// loadgen: many SSE sync streams against mxsse, over HTTP/2 with TLS or
// over HTTP/1.1 (TLS or cleartext), driven by bench/scale. One file on
// purpose: one small program whose commands share the stream table.
//
// It reads one JSON command per line on stdin and answers each with one
// JSON line on stdout (progress goes to stderr):
//
//	{"cmd":"open", ...}      open N streams at a controlled rate, wait until
//	                         every one has its 200 (or failed / timed out)
//	{"cmd":"stats"}          per-stream event and heartbeat counts
//	{"cmd":"fanout", ...}    send one message, time its arrival at every stream
//	{"cmd":"expect_reopen"}  remember every stream's open count (before a restart)
//	{"cmd":"wait_reopen",..} wait until every stream reconnected (honouring the
//	                         server's retry: and sending Last-Event-ID)
//	{"cmd":"close"}          close everything, stop reconnecting
//
// One goroutine per connection and one per stream; each stream parses its
// SSE body line by line (events, ": " heartbeats, id:, retry:) and looks
// for the current fan-out marker in data: lines only.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
)

// openCmd opens N streams: N/per_conn connections, dialled at `rate`
// connections per second (0: all at once), connection i from
// sources[i % len] to targets[i % len], stream j with tokens[j % len].
type openCmd struct {
	Proto     string   `json:"proto"` // "h2" (TLS, ALPN h2) or "h1"
	TLS       bool     `json:"tls"`   // h1 only: TLS with ALPN http/1.1, else cleartext
	N         int      `json:"n"`
	PerConn   int      `json:"per_conn"`
	Rate      float64  `json:"rate"`
	Targets   []string `json:"targets"`
	Sources   []string `json:"sources"`
	Path      string   `json:"path"` // with query, e.g. /_matrix/client/v3/sync/sse?heartbeat_interval=5
	Tokens    []string `json:"tokens"`
	Since     []string `json:"since"` // per token: the position to start from (may be empty)
	Wait      float64  `json:"wait"`  // seconds to wait for every 200
	Reconnect bool     `json:"reconnect"`
	Gzip      bool     `json:"gzip"` // h2 only: ask for gzip (Go's transport decodes it)
}

type command struct {
	Cmd string `json:"cmd"`
	openCmd
	HS      string  `json:"hs"`
	Token   string  `json:"token"`
	Room    string  `json:"room"`
	Timeout float64 `json:"timeout"`
}

type stream struct {
	idx     int
	token   string
	lastID  atomic.Pointer[string]
	retryMS atomic.Int64
	open    atomic.Bool
	opens   atomic.Int64
	events  atomic.Int64
	beats   atomic.Int64
	ends    atomic.Int64
	errs    atomic.Int64
	marker  atomic.Int64 // unix ns the current marker arrived, 0 if not yet
	status  atomic.Int64 // last HTTP status
	openAt  atomic.Int64 // unix ns of the last 200
	endedAt atomic.Int64
}

type conn struct {
	idx     int
	streams []*stream
	src     string
	target  string
}

type gen struct {
	mu         sync.Mutex
	streams    []*stream
	conns      []*conn
	handshakes []int64 // unix ns of each completed TLS handshake (or TCP connect for cleartext)
	dialErrs   atomic.Int64
	marker     atomic.Pointer[[]byte]
	stopping   atomic.Bool
	ctx        context.Context
	cancel     context.CancelFunc
	liveConns  sync.Map // *conn -> net.Conn
	reopenBase map[*stream]int64
	reopenT0   time.Time
	cfg        openCmd // of the last open (reconnects reuse it)
}

func now() int64 { return time.Now().UnixNano() }

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "[loadgen %s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, a...))
}

func (g *gen) noteHandshake() {
	t := now()
	g.mu.Lock()
	g.handshakes = append(g.handshakes, t)
	g.mu.Unlock()
}

func tlsConfig(alpn string) *tls.Config {
	return &tls.Config{
		InsecureSkipVerify: true, // a self-signed certificate on loopback
		NextProtos:         []string{alpn},
		// No session cache: every client is a new device (full handshake);
		// after a restart the server's ticket keys are new anyway.
		CurvePreferences: []tls.CurveID{tls.X25519},
	}
}

func (g *gen) dial(c *conn, cfg *openCmd) (net.Conn, error) {
	d := net.Dialer{Timeout: 60 * time.Second}
	if c.src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(c.src)}
	}
	raw, err := d.DialContext(g.ctx, "tcp", c.target)
	if err != nil {
		return nil, err
	}
	if cfg.Proto == "h1" && !cfg.TLS {
		g.noteHandshake()
		return raw, nil
	}
	alpn := "h2"
	if cfg.Proto == "h1" {
		alpn = "http/1.1"
	}
	tc := tls.Client(raw, tlsConfig(alpn))
	hctx, cancel := context.WithTimeout(g.ctx, 60*time.Second)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		raw.Close()
		return nil, err
	}
	if got := tc.ConnectionState().NegotiatedProtocol; got != alpn && !(alpn == "http/1.1" && got == "") {
		tc.Close()
		return nil, fmt.Errorf("ALPN %q, wanted %q", got, alpn)
	}
	g.noteHandshake()
	return tc, nil
}

func (g *gen) request(s *stream, cfg *openCmd, host string, since string) *http.Request {
	u := cfg.Path
	if since != "" && s.lastID.Load() == nil {
		sep := "?"
		if strings.Contains(u, "?") {
			sep = "&"
		}
		u += sep + "since=" + url.QueryEscape(since)
	}
	req, _ := http.NewRequestWithContext(g.ctx, "GET", "https://"+host+u, nil)
	req.Header.Set("Authorization", "Bearer "+s.token)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("User-Agent", "mxsse-loadgen/1")
	if id := s.lastID.Load(); id != nil && *id != "" {
		req.Header.Set("Last-Event-ID", *id)
	}
	return req
}

// readSSE parses one SSE body until it ends.
func (g *gen) readSSE(s *stream, body io.Reader) {
	br := bufio.NewReaderSize(body, 4096)
	hasData := false
	var pendingID *string
	for {
		line, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			// A long data: line (a big /sync body): scan it in pieces.
			if m := g.marker.Load(); m != nil && bytes.Contains(line, *m) {
				s.marker.CompareAndSwap(0, now())
			}
			hasData = true
			for err == bufio.ErrBufferFull {
				line, err = br.ReadSlice('\n')
				if m := g.marker.Load(); m != nil && bytes.Contains(line, *m) {
					s.marker.CompareAndSwap(0, now())
				}
			}
			if err != nil {
				return
			}
			continue
		}
		if err != nil {
			return
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0:
			if hasData {
				s.events.Add(1)
				if pendingID != nil {
					s.lastID.Store(pendingID)
				}
			}
			hasData, pendingID = false, nil
		case line[0] == ':':
			s.beats.Add(1)
		case bytes.HasPrefix(line, []byte("data:")):
			hasData = true
			if m := g.marker.Load(); m != nil && bytes.Contains(line, *m) {
				s.marker.CompareAndSwap(0, now())
			}
		case bytes.HasPrefix(line, []byte("id:")):
			id := strings.TrimSpace(string(line[3:]))
			pendingID = &id
		case bytes.HasPrefix(line, []byte("retry:")):
			if v, err := strconv.Atoi(strings.TrimSpace(string(line[6:]))); err == nil {
				s.retryMS.Store(int64(v))
			}
		}
	}
}

func (g *gen) opened(s *stream) {
	s.openAt.Store(now())
	s.open.Store(true)
	s.opens.Add(1)
}

func (g *gen) ended(s *stream) {
	if s.open.Swap(false) {
		s.endedAt.Store(now())
	}
	s.ends.Add(1)
}

// runConn keeps one connection (and its streams) going: dial, open the
// streams, read them, and when everything ended wait the server's retry:
// and do it again, as EventSource does, until told to stop.
func (g *gen) runConn(c *conn, cfg *openCmd, since func(*stream) string) {
	for !g.stopping.Load() {
		nc, err := g.dial(c, cfg)
		if err != nil {
			g.dialErrs.Add(1)
			for _, s := range c.streams {
				s.errs.Add(1)
			}
		} else {
			g.liveConns.Store(c, nc)
			if cfg.Proto == "h2" {
				g.runH2(c, cfg, nc, since)
			} else {
				g.runH1(c, cfg, nc, since)
			}
			nc.Close()
			g.liveConns.Delete(c)
		}
		if !cfg.Reconnect || g.stopping.Load() {
			return
		}
		retry := c.streams[0].retryMS.Load()
		if retry <= 0 {
			retry = 3000 // EventSource's usual default
		}
		select {
		case <-g.ctx.Done():
			return
		case <-time.After(time.Duration(retry) * time.Millisecond):
		}
	}
}

func (g *gen) runH2(c *conn, cfg *openCmd, nc net.Conn, since func(*stream) string) {
	// Go's transport asks for gzip unless told not to; the h1 path never
	// does, and a compressed stream costs mxsse a deflate context.
	tr := &http2.Transport{DisableCompression: !cfg.Gzip}
	cc, err := tr.NewClientConn(nc)
	if err != nil {
		g.dialErrs.Add(1)
		return
	}
	defer cc.Close()
	var wg sync.WaitGroup
	for _, s := range c.streams {
		wg.Add(1)
		go func(s *stream) {
			defer wg.Done()
			resp, err := cc.RoundTrip(g.request(s, cfg, c.target, since(s)))
			if err != nil {
				s.errs.Add(1)
				return
			}
			defer resp.Body.Close()
			s.status.Store(int64(resp.StatusCode))
			if resp.StatusCode != 200 {
				io.Copy(io.Discard, resp.Body)
				s.errs.Add(1)
				return
			}
			g.opened(s)
			g.readSSE(s, resp.Body)
			g.ended(s)
		}(s)
	}
	wg.Wait()
}

func (g *gen) runH1(c *conn, cfg *openCmd, nc net.Conn, since func(*stream) string) {
	s := c.streams[0]
	req := g.request(s, cfg, c.target, since(s))
	var b bytes.Buffer
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\n", req.URL.RequestURI(), c.target)
	for k, v := range req.Header {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v[0])
	}
	b.WriteString("\r\n")
	if _, err := nc.Write(b.Bytes()); err != nil {
		s.errs.Add(1)
		return
	}
	br := bufio.NewReaderSize(nc, 4096)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		s.errs.Add(1)
		return
	}
	defer resp.Body.Close()
	s.status.Store(int64(resp.StatusCode))
	if resp.StatusCode != 200 {
		s.errs.Add(1)
		return
	}
	g.opened(s)
	g.readSSE(s, resp.Body)
	g.ended(s)
}

// --- commands ---------------------------------------------------------

type pct struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
	Min float64 `json:"min"`
}

func percentiles(v []float64) pct {
	if len(v) == 0 {
		return pct{}
	}
	sort.Float64s(v)
	at := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(v)))) - 1
		if i < 0 {
			i = 0
		}
		return round(v[i])
	}
	return pct{len(v), at(0.5), at(0.9), at(0.99), round(v[len(v)-1]), round(v[0])}
}

func round(x float64) float64 { return math.Round(x*100) / 100 }

// handshakeWindow: TLS handshakes (TCP connects for cleartext) completed in
// [t0, t1]: count, mean rate over the span from t0 to the last one, and the
// busiest one-second bucket.
func (g *gen) handshakeWindow(t0, t1 int64) map[string]any {
	g.mu.Lock()
	var ts []int64
	for _, t := range g.handshakes {
		if t >= t0 && t <= t1 {
			ts = append(ts, t)
		}
	}
	g.mu.Unlock()
	out := map[string]any{"count": len(ts)}
	if len(ts) == 0 {
		return out
	}
	sort.Slice(ts, func(i, j int) bool { return ts[i] < ts[j] })
	span := float64(ts[len(ts)-1]-t0) / 1e9
	buckets := map[int64]int{}
	peak := 0
	for _, t := range ts {
		b := (t - t0) / 1e9
		buckets[b]++
		if buckets[b] > peak {
			peak = buckets[b]
		}
	}
	out["span_s"] = round(span)
	if span > 0 {
		out["mean_per_s"] = round(float64(len(ts)) / span)
	}
	out["peak_1s"] = peak
	return out
}

func (g *gen) open(cmd *openCmd) map[string]any {
	if cmd.PerConn < 1 {
		cmd.PerConn = 1
	}
	if cmd.Proto == "h1" {
		cmd.PerConn = 1
	}
	if cmd.Wait <= 0 {
		cmd.Wait = 300
	}
	g.cfg = *cmd
	cfg := g.cfg
	sinceOf := map[string]string{}
	for i, tok := range cmd.Tokens {
		if i < len(cmd.Since) {
			sinceOf[tok] = cmd.Since[i]
		}
	}
	since := func(s *stream) string { return sinceOf[s.token] }
	var fresh []*stream
	var conns []*conn
	g.mu.Lock()
	base := len(g.streams)
	for i := 0; i < cmd.N; i++ {
		s := &stream{idx: base + i, token: cmd.Tokens[(base+i)%len(cmd.Tokens)]}
		fresh = append(fresh, s)
		g.streams = append(g.streams, s)
	}
	for i := 0; i < len(fresh); i += cmd.PerConn {
		j := i + cmd.PerConn
		if j > len(fresh) {
			j = len(fresh)
		}
		k := len(g.conns)
		c := &conn{idx: k, streams: fresh[i:j], target: cmd.Targets[k%len(cmd.Targets)]}
		if len(cmd.Sources) > 0 {
			c.src = cmd.Sources[k%len(cmd.Sources)]
		}
		conns = append(conns, c)
		g.conns = append(g.conns, c)
	}
	g.mu.Unlock()
	t0 := now()
	errs0 := g.dialErrs.Load()
	go func() {
		start := time.Now()
		for i, c := range conns {
			if cmd.Rate > 0 {
				at := start.Add(time.Duration(float64(i) / cmd.Rate * 1e9))
				if d := time.Until(at); d > 0 {
					time.Sleep(d)
				}
			}
			go g.runConn(c, &cfg, since)
		}
	}()
	deadline := time.Now().Add(time.Duration(cmd.Wait * 1e9))
	lastLog := time.Now()
	for {
		ready, failed := 0, 0
		for _, s := range fresh {
			if s.opens.Load() > 0 {
				ready++
			} else if s.errs.Load() > 0 && !cmd.Reconnect {
				failed++
			}
		}
		if ready+failed == len(fresh) || time.Now().After(deadline) {
			t1 := now()
			var openMS []float64
			statuses := map[string]int{}
			for _, s := range fresh {
				if at := s.openAt.Load(); at > 0 {
					openMS = append(openMS, float64(at-t0)/1e6)
				}
				if st := s.status.Load(); st != 200 {
					statuses[strconv.FormatInt(st, 10)]++
				}
			}
			return map[string]any{
				"streams": len(fresh), "conns": len(conns), "ready": ready, "failed": failed,
				"elapsed_s":   round(float64(t1-t0) / 1e9),
				"open_ms":     percentiles(openMS),
				"handshakes":  g.handshakeWindow(t0, t1),
				"dial_errors": g.dialErrs.Load() - errs0,
				"not_200":     statuses,
			}
		}
		if time.Since(lastLog) > 5*time.Second {
			logf("open: %d/%d streams ready, %d failed", ready, len(fresh), failed)
			lastLog = time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (g *gen) stats() map[string]any {
	g.mu.Lock()
	ss := append([]*stream(nil), g.streams...)
	g.mu.Unlock()
	var open, events, beats, ends, errs int64
	minB, maxB := int64(math.MaxInt64), int64(0)
	for _, s := range ss {
		if s.open.Load() {
			open++
		}
		b := s.beats.Load()
		events += s.events.Load()
		beats += b
		ends += s.ends.Load()
		errs += s.errs.Load()
		if b < minB {
			minB = b
		}
		if b > maxB {
			maxB = b
		}
	}
	if len(ss) == 0 {
		minB = 0
	}
	return map[string]any{"streams": len(ss), "open": open, "events": events, "heartbeats": beats,
		"heartbeats_min": minB, "heartbeats_max": maxB, "ends": ends, "errors": errs,
		"dial_errors": g.dialErrs.Load()}
}

// fanout sends one message (PUT to the homeserver) whose body carries a
// fresh marker and times its arrival at every open stream.
func (g *gen) fanout(c *command) map[string]any {
	mb := make([]byte, 8)
	rand.Read(mb)
	marker := []byte("mxscale-" + hex.EncodeToString(mb))
	g.mu.Lock()
	ss := []*stream{}
	for _, s := range g.streams {
		if s.open.Load() {
			ss = append(ss, s)
		}
	}
	g.mu.Unlock()
	for _, s := range ss {
		s.marker.Store(0)
	}
	g.marker.Store(&marker)
	body, _ := json.Marshal(map[string]string{"msgtype": "m.text", "body": string(marker)})
	u := fmt.Sprintf("%s/_matrix/client/v3/rooms/%s/send/m.room.message/%s", c.HS,
		url.PathEscape(c.Room), marker)
	req, _ := http.NewRequest("PUT", u, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+c.Token)
	req.Header.Set("Content-Type", "application/json")
	t0 := now()
	resp, err := (&http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{Proxy: nil}}).Do(req)
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	tSent := now()
	if resp.StatusCode != 200 {
		return map[string]any{"error": fmt.Sprintf("send: HTTP %d", resp.StatusCode)}
	}
	if c.Timeout <= 0 {
		c.Timeout = 60
	}
	deadline := time.Now().Add(time.Duration(c.Timeout * 1e9))
	for {
		got := 0
		for _, s := range ss {
			if s.marker.Load() != 0 {
				got++
			}
		}
		if got == len(ss) || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	var lat []float64
	first, last := int64(math.MaxInt64), int64(0)
	for _, s := range ss {
		if t := s.marker.Load(); t != 0 {
			lat = append(lat, float64(t-t0)/1e6)
			if t < first {
				first = t
			}
			if t > last {
				last = t
			}
		}
	}
	out := map[string]any{"streams": len(ss), "received": len(lat),
		"send_ms": round(float64(tSent-t0) / 1e6), "arrival_ms": percentiles(lat)}
	// Streams of one token share one fetch and one encoded event: the
	// spread within such a group is the front's fan-out of one batch,
	// without the differences between the groups' upstream fetches.
	type group struct{ n, first, last int64 }
	groups := map[string]*group{}
	for _, s := range ss {
		t := s.marker.Load()
		if t == 0 {
			continue
		}
		g := groups[s.token]
		if g == nil {
			g = &group{0, t, t}
			groups[s.token] = g
		}
		g.n++
		if t < g.first {
			g.first = t
		}
		if t > g.last {
			g.last = t
		}
	}
	var spreads, rates []float64
	for _, g := range groups {
		spreads = append(spreads, float64(g.last-g.first)/1e6)
		if g.last > g.first {
			rates = append(rates, float64(g.n-1)/(float64(g.last-g.first)/1e9))
		}
	}
	out["batches"] = len(groups)
	out["batch_spread_ms"] = percentiles(spreads)
	out["batch_events_per_s"] = percentiles(rates)
	if len(lat) > 1 && last > first {
		spread := float64(last-first) / 1e9
		out["first_to_last_ms"] = round(spread * 1e3)
		out["events_per_s"] = round(float64(len(lat)-1) / spread)
	}
	return out
}

func (g *gen) expectReopen() map[string]any {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.reopenBase = map[*stream]int64{}
	for _, s := range g.streams {
		g.reopenBase[s] = s.opens.Load()
	}
	g.reopenT0 = time.Now()
	return map[string]any{"streams": len(g.streams)}
}

func (g *gen) waitReopen(timeout float64) map[string]any {
	g.mu.Lock()
	ss := append([]*stream(nil), g.streams...)
	base, t0 := g.reopenBase, g.reopenT0
	g.mu.Unlock()
	if timeout <= 0 {
		timeout = 300
	}
	deadline := time.Now().Add(time.Duration(timeout * 1e9))
	lastLog := time.Now()
	for {
		n := 0
		for _, s := range ss {
			if s.opens.Load() > base[s] && s.open.Load() {
				n++
			}
		}
		if n == len(ss) || time.Now().After(deadline) {
			break
		}
		if time.Since(lastLog) > 5*time.Second {
			logf("reopen: %d/%d streams back", n, len(ss))
			lastLog = time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
	var back, gap []float64
	var lastAt int64
	for _, s := range ss {
		if s.opens.Load() > base[s] && s.open.Load() {
			at := s.openAt.Load()
			back = append(back, float64(at-t0.UnixNano())/1e6)
			if e := s.endedAt.Load(); e > 0 && e < at {
				gap = append(gap, float64(at-e)/1e6)
			}
			if at > lastAt {
				lastAt = at
			}
		}
	}
	return map[string]any{"streams": len(ss), "back": len(back),
		"back_ms_since_restart": percentiles(back), "gap_ms": percentiles(gap),
		"handshakes": g.handshakeWindow(t0.UnixNano(), now()), "dial_errors": g.dialErrs.Load()}
}

func (g *gen) closeAll() map[string]any {
	g.stopping.Store(true)
	g.cancel()
	n := 0
	g.liveConns.Range(func(k, v any) bool {
		v.(net.Conn).Close()
		n++
		return true
	})
	return map[string]any{"closed": n}
}

func raiseNofile() uint64 {
	var r syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r) == nil {
		r.Cur = r.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
		return r.Cur
	}
	return 0
}

func main() {
	limit := raiseNofile()
	g := &gen{}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	logf("ready (open files: %d)", limit)
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var c command
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			out.Encode(map[string]any{"error": err.Error()})
			continue
		}
		var res map[string]any
		switch c.Cmd {
		case "open":
			if len(c.Targets) == 0 || len(c.Tokens) == 0 || c.N <= 0 {
				res = map[string]any{"error": "open needs targets, tokens and n"}
			} else {
				res = g.open(&c.openCmd)
			}
		case "stats":
			res = g.stats()
		case "fanout":
			res = g.fanout(&c)
		case "expect_reopen":
			res = g.expectReopen()
		case "wait_reopen":
			res = g.waitReopen(c.Timeout)
		case "close":
			res = g.closeAll()
		default:
			res = map[string]any{"error": errors.New("unknown command " + c.Cmd).Error()}
		}
		out.Encode(res)
	}
	g.closeAll()
}
