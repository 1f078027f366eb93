// Command vcsim is Tidemark's minimal vCenter simulator launcher.
//
// It serves govmomi's simulator (vcsim) with an EMPTY vCenter inventory (no
// datacenters, hosts, datastores or VMs); simulator/vcenter.py populates it
// over the vSphere API. Once serving, it prints one JSON line to stdout:
//
//	{"url": "http://127.0.0.1:PORT/sdk", "pid": N}
//
// and runs until SIGTERM or SIGINT.
//
// Build (GOPATH mode, Debian golang-github-vmware-govmomi-dev):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o vcsim simulator/vcsim/main.go
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0: any free port)")
	useTLS := flag.Bool("tls", false, "serve HTTPS with a self-signed certificate (default plain HTTP)")
	username := flag.String("username", "user", "login user name")
	password := flag.String("password", "pass", "login password")
	flag.Parse()
	// Catch signals before the URL is printed: a caller may stop us right after reading it.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)

	// VPX() is the vCenter service content; zero every count for an empty inventory.
	model := simulator.VPX()
	model.Datacenter = 0
	model.Portgroup = 0
	model.Host = 0
	model.Cluster = 0
	model.ClusterHost = 0
	model.Datastore = 0
	model.Machine = 0
	model.Autostart = false
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: create model: %v", err)
	}
	defer model.Remove()

	// A User other than simulator.DefaultLogin makes vcsim check the exact credentials.
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	if *useTLS {
		model.Service.TLS = new(tls.Config)
	}

	server := model.Service.NewServer()
	defer server.Close()

	u := *server.URL
	u.User = nil
	line, _ := json.Marshal(map[string]interface{}{"url": u.String(), "pid": os.Getpid()})
	fmt.Println(string(line))

	sig := <-signals
	log.Printf("vcsim: %s received, shutting down", sig)
}
