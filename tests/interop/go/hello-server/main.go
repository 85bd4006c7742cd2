// Command hello-server is the gRPC "hello" server of the Consul + gRPC tutorial: grpc-go's
// helloworld Greeter with grpc-go's standard health server. SIGUSR1 sets every health status to
// NOT_SERVING, SIGUSR2 to SERVING; the optional control port does the same over HTTP
// (POST /serving, POST /not-serving). SIGTERM/SIGINT stop it gracefully (bounded by -grace), or at
// once with -shutdown immediate (the worst case for clients), and exit 0.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	pb "google.golang.org/grpc/examples/helloworld/helloworld"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

type greeter struct {
	pb.UnimplementedGreeterServer
	name string
	work time.Duration
}

func (g *greeter) SayHello(ctx context.Context, in *pb.HelloRequest) (*pb.HelloReply, error) {
	select {
	case <-time.After(g.work):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return &pb.HelloReply{Message: fmt.Sprintf("Hello %s from %s", in.GetName(), g.name)}, nil
}

var services = []string{"", "helloworld.Greeter"}

func setAll(hs *health.Server, status healthpb.HealthCheckResponse_ServingStatus) {
	for _, s := range services {
		hs.SetServingStatus(s, status)
	}
	log.Printf("hello-server: health now %s", status)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:50051", "gRPC listen address")
	name := flag.String("name", "", "name used in replies (default: the listen address)")
	control := flag.String("control", "", "optional HTTP control address")
	grace := flag.Duration("grace", 5*time.Second, "bound on the graceful stop")
	work := flag.Duration("work", 0, "time each SayHello takes (simulated work, so RPCs are in flight)")
	shutdown := flag.String("shutdown", "graceful", "on SIGTERM: graceful (GracefulStop, bounded by -grace) or immediate (Stop: close connections, cancel RPCs in flight)")
	flag.Parse()

	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("hello-server: listen: %v", err)
	}
	if *name == "" {
		*name = lis.Addr().String()
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	setAll(hs, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	pb.RegisterGreeterServer(srv, &greeter{name: *name, work: *work})

	if *control != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("POST /serving", func(w http.ResponseWriter, _ *http.Request) {
			setAll(hs, healthpb.HealthCheckResponse_SERVING)
			fmt.Fprintln(w, "SERVING")
		})
		mux.HandleFunc("POST /not-serving", func(w http.ResponseWriter, _ *http.Request) {
			setAll(hs, healthpb.HealthCheckResponse_NOT_SERVING)
			fmt.Fprintln(w, "NOT_SERVING")
		})
		go func() { log.Print(http.ListenAndServe(*control, mux)) }()
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for sig := range sigs {
			switch sig {
			case syscall.SIGUSR1:
				setAll(hs, healthpb.HealthCheckResponse_NOT_SERVING)
			case syscall.SIGUSR2:
				setAll(hs, healthpb.HealthCheckResponse_SERVING)
			default:
				if *shutdown == "immediate" {
					log.Printf("hello-server: %s: stopping immediately", sig)
					srv.Stop()
					os.Exit(0)
				}
				log.Printf("hello-server: %s: stopping gracefully", sig)
				done := make(chan struct{})
				go func() { srv.GracefulStop(); close(done) }()
				select {
				case <-done:
				case <-time.After(*grace):
					srv.Stop()
				}
				os.Exit(0)
			}
		}
	}()

	fmt.Printf("hello-server listening on %s\n", lis.Addr())
	if err := srv.Serve(lis); err != nil {
		log.Fatalf("hello-server: %v", err)
	}
}
